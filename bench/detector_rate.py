"""Scoring rate of the saved detector (``lowgrad.OODDetector``) against the extract stage, on one finished run's
route and one of its prepared sets, in one process:

- ``extract_stage``: the ``extract@<set>`` stage's own recorded wall time (``artifacts/timings``: model load,
  gradients and the zarr writes) per image; ``extract_and_project_stages``: with ``project@<set>``'s time added
  (on the matrix-free route ``extract`` runs the forward pass only and ``project`` computes the gradients);
- ``extract_compute``: the same stage's work in this process, model built, nothing written
  (``Extractor.compute`` over the set): what the stage spends per image once started;
- ``extract_and_project_compute``: that plus the ``project`` stage's pass (``G_low`` and ``||phi||^2`` of those
  rows, in float64), the work a new image needs before any detector (stored-gradient routes);
- ``detector_score``: ``OODDetector.score(images)`` for every row of the run (forward pass, gradients on the run's
  route, ``G_low``, every detector and fusion row), after ``OODDetector.load`` (timed on its own); and for one
  gradient row alone (``grad_knn``): the same work as extract + project plus one detector.

Ratios are images per second of ``detector_score`` over each extract rate (the issue's bar: >= 0.8). The best of
``--repeats`` interleaved runs is kept for each in-process figure (their min and max are in ``spread_s``).

    python -m bench.detector_rate --run . --set id_test --out bench/results/detector_rate_embedded.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def measure(run: Path, name: str, repeats: int) -> dict:
    from lowgrad import OODDetector  # first: lowgrad sets OpenMP's wait policy before torch loads

    import torch
    from lowgrad.data import load_image_set
    from lowgrad.extract import build_extractor
    from lowgrad.paths import PREPARED
    from lowgrad.route import Route
    from lowgrad.rows import detector_row_name
    from lowgrad.timing import collect

    start = time.perf_counter()
    detector = OODDetector.load(run)
    load_s = time.perf_counter() - start
    params = detector.params  # the run's, as the detector saved them
    images = load_image_set(run / PREPARED.format(name=name)).images
    n = len(images)
    recorded = collect(run)  # the stages' own timings; absent where the stages ran in one process (tests)
    stage = recorded.get(f"extract@{name}")
    project_stage = recorded.get(f"project@{name}")  # the matrix-free route computes the gradients here

    with torch.inference_mode(False):
        extractor = build_extractor(params, name, run)
    chunk = params.gradient.chunk_rows
    computed = [extractor.compute(slice(i, min(i + chunk, n))) for i in range(0, n, chunk)]
    one_row = detector_row_name("knn", True)  # one gradient row: the same work as extract + project, plus KNN
    if one_row not in detector.rows:
        raise SystemExit(f"error: {run} has no {one_row} row (scoring.gradient.knn): the one-row figure needs it")
    work = {
        "extract": lambda: [extractor.compute(slice(i, min(i + chunk, n))) for i in range(0, n, chunk)],
        "score": lambda: detector.score(images),
        "one_row": lambda: detector.score(images, rows=[one_row]),
    }
    if "grads" in computed[0]:  # the project stage's pass over the stored rows (not on the matrix-free route)
        from lowgrad.paths import SUBSPACE
        from lowgrad.subspace import GradientSubspace, RowPasses

        route = Route.from_params(params)
        sub = GradientSubspace.load(run / SUBSPACE, dim=extractor.gradients.dim, kernel=route.subspace_kernel,
                                    basis=params.subspace.basis)
        blocks = [(slice(i * chunk, i * chunk + len(c["grads"])), c["grads"]) for i, c in enumerate(computed)]
        work["project"] = lambda: sub.transform_blocks_with_sqnorm(RowPasses(lambda: iter(blocks), n, blocks[0][1].shape[1]))
    times: dict[str, list[float]] = {key: [] for key in work}
    with torch.inference_mode(False):
        for _ in range(repeats):  # interleaved, so a slower spell of this shared machine hits every figure alike
            for key, fn in work.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    compute_s, score_s, one_row_s = (min(times[k]) for k in ("extract", "score", "one_row"))
    project_s = min(times["project"]) if "project" in times else None
    rates = {"extract_compute": n / compute_s, "detector_score": n / score_s, f"detector_score_{one_row}": n / one_row_s}
    if project_s is not None:
        rates["extract_and_project_compute"] = n / (compute_s + project_s)
    if stage is not None:
        rates["extract_stage"] = n / stage["wall_s"]
        if project_stage is not None:
            rates["extract_and_project_stages"] = n / (stage["wall_s"] + project_stage["wall_s"])
    return {
        "run": str(run.resolve().name), "set": name, "images": n, "route": Route.from_params(params).name,
        "arch": params.model.arch, "rows": len(detector.rows), "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "(libgomp's default: spin, then sleep)",
        "images_per_s": {k: round(v, 1) for k, v in rates.items()},
        "detector_load_s": round(load_s, 3),
        "repeats": repeats, "spread_s": {k: [round(min(v), 4), round(max(v), 4)] for k, v in times.items()},
        "ratio_score_over_extract_stage": round(rates["detector_score"] / rates["extract_stage"], 3) if stage else None,
        "ratio_score_over_extract_and_project_stages": round(rates["detector_score"] / rates["extract_and_project_stages"], 3)
        if "extract_and_project_stages" in rates else None,
        "ratio_score_over_extract_compute": round(rates["detector_score"] / rates["extract_compute"], 3),
        "ratio_score_over_extract_and_project_compute":
            round(rates["detector_score"] / rates["extract_and_project_compute"], 3) if project_s else None,
        f"ratio_{one_row}_over_extract_and_project_compute":
            round(rates[f"detector_score_{one_row}"] / rates["extract_and_project_compute"], 3) if project_s else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", default=[], help="a finished project (repeatable; default: .)")
    parser.add_argument("--set", default="id_test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the results here (JSON)")
    args = parser.parse_args()
    results = [measure(Path(run), args.set, args.repeats) for run in (args.run or ["."])]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
