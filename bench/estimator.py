"""``lowgrad.LowGrad`` against the pipeline's stages (issue 37), on one finished run's params, model and prepared
sets, in one process, back to back:

- ``pipeline_s``: the stage bodies from ``factors`` to ``score`` (every ``extract@`` / ``project@`` set) run in a
  scratch copy of the run (its params, ``dvc.yaml``, ``dvc.lock``, prepared sets and model), as ``dvc repro`` runs
  them, each timed; ``score`` also bootstraps the metrics and sweeps k, which the estimator does not do;
- ``estimator_s``: ``LowGrad.from_params(params, model).fit(id_train, test=id_test)`` plus ``score_samples`` of
  every OOD set, and the scores checked against the scratch run's (rtol 1e-5);
- ``estimator_work_dir_s``: the same with ``fit(..., work_dir=)`` in a fresh folder (the rows stream through chunked
  stores on disk, as the stages' do), and ``estimator_reuse_s`` a second such fit in that folder, which reuses its
  stores and factors (what fitting other detectors from one extraction costs); scores checked alike.

``ratio`` = ``pipeline_s / estimator_s`` (the issue's bar: >= 0.9, the estimator no slower than about 1.1 x the
stages), ``ratio_work_dir`` = ``pipeline_s / estimator_work_dir_s``; the best of ``--repeats`` interleaved runs of
each is kept.

    python -m bench.estimator --run . --out bench/results/estimator_vs_pipeline/embedded.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from lowgrad import paths
from lowgrad.config import USER_CODE

COPIED = (paths.PARAMS, paths.DVC_YAML, paths.DVC_LOCK, str(Path(paths.PREPARED).parent), paths.MODEL, paths.MODEL_INFO, USER_CODE)
BEFORE_FACTORS = ("prepare", "train", "model")


def _scratch(run: Path) -> Path:
    root = Path(tempfile.mkdtemp(prefix="lowgrad-bench-estimator-"))
    for rel in COPIED:
        src = run / rel
        if src.is_dir():
            shutil.copytree(src, root / rel)
        elif src.exists():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    return root


def pipeline_once(run: Path) -> tuple[float, dict[str, float], dict[str, dict[str, object]]]:
    """The stage bodies factors .. score in a scratch copy: (total s, s per stage, stored scores)."""
    from lowgrad.config import load_params
    from lowgrad.pipeline import stage_bodies
    from lowgrad.stages.score import read_scores

    root, here = _scratch(run), Path.cwd()
    try:
        os.chdir(root)
        params = load_params(paths.PARAMS)
        per_stage = {}
        for name, body, args in stage_bodies(params, root):
            if name.partition("@")[0] in (*BEFORE_FACTORS, "report"):
                continue
            started = time.perf_counter()
            body(params, *args)
            per_stage[name] = time.perf_counter() - started
        return sum(per_stage.values()), per_stage, read_scores()
    finally:
        os.chdir(here)
        shutil.rmtree(root, ignore_errors=True)


def estimator_once(run: Path, work_dir: Path | None = None) -> tuple[float, dict[str, dict[str, object]]]:
    from lowgrad import LowGrad
    from lowgrad.config import load_params
    from lowgrad.data import load_image_set
    from lowgrad.models import load_classifier

    params = load_params(run / paths.PARAMS)
    sets = {name: load_image_set(run / paths.PREPARED.format(name=name)) for name in params.data.datasets}
    model = load_classifier(params, run)
    started = time.perf_counter()
    det = LowGrad.from_params(run / paths.PARAMS, model=model)
    det.fit(sets["id_train"].images, sets["id_train"].labels, test=(sets["id_test"].images, sets["id_test"].labels),
            work_dir=work_dir)
    scores = {name: det.score_samples(sets[name].images) for name in params.data.ood_names}
    return time.perf_counter() - started, scores


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("."), help="a finished run's project folder")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run = args.run.resolve()
    pipeline, stages = [], {}
    estimator: dict[str, list[float]] = {"memory": [], "work_dir": [], "reuse": []}
    for _ in range(args.repeats):
        total, per_stage, stored = pipeline_once(run)
        pipeline.append(total)
        stages = per_stage if total == min(pipeline) else stages
        work_dir = Path(tempfile.mkdtemp(prefix="lowgrad-bench-work-"))
        try:
            for kind, folder in (("memory", None), ("work_dir", work_dir), ("reuse", work_dir)):
                took, scores = estimator_once(run, folder)
                estimator[kind].append(took)
                for name, rows in scores.items():
                    for row, s in rows.items():
                        ref = stored[row][name]
                        np.testing.assert_allclose(s, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(),
                                                   err_msg=f"{kind}: {row} {name}")
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
    import torch

    result = {
        "run": str(args.run), "route": json.loads((run / paths.DETECTOR_META).read_text())["params"]["gradient"],
        "pipeline_s": min(pipeline), "estimator_s": min(estimator["memory"]),
        "estimator_work_dir_s": min(estimator["work_dir"]), "estimator_reuse_s": min(estimator["reuse"]),
        "ratio": min(pipeline) / min(estimator["memory"]), "ratio_work_dir": min(pipeline) / min(estimator["work_dir"]),
        "spread_s": {"pipeline": [min(pipeline), max(pipeline)],
                     **{f"estimator_{kind}": [min(t), max(t)] for kind, t in estimator.items()}},
        "pipeline_stages_s": stages, "scores_equal_rtol": 1e-5,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("pipeline_s", "estimator_s", "estimator_work_dir_s", "estimator_reuse_s",
                                             "ratio", "ratio_work_dir")}))


if __name__ == "__main__":
    main()
