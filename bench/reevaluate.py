"""Read a finished run's scores again with this checkout's evaluation (no gradient, basis or detector is recomputed):
for a long run whose code predates a reading the report now gives (issue 39's family-wise intervals), so that its
results carry it without repeating hours of extraction.

    python -m bench.reevaluate --run /path/to/finished/run --params-file configs/<profile>.yaml \
        --out bench/results/<name>

It reads the run's ``artifacts/scores.npz``, ``report/metrics.json``, subspace, stores' sizes and model info,
recomputes the evidence (every metric, its interval and every comparison, per comparison and family-wise) with
``scoring`` of ``--params-file`` (its other sections must equal the run's own ``params.yaml``: one ``error:`` line
otherwise), checks that every per-comparison number equals the run's own (same seed and replicates: the evaluation
of the run is reproduced, not replaced), and writes ``metrics.json``, ``report.md`` and ``plots/`` to ``--out``;
``metrics.json`` records the run's metrics digest and the command under ``reevaluated``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from lowgrad import __version__
from lowgrad.comparison import evaluate
from lowgrad.config import load_params
from lowgrad.errors import LowgradError, exit_on_user_error
from lowgrad.paths import EXTRACTED, METRICS, MODEL_INFO, PARAMS, SCORES, SUBSPACE
from lowgrad.report import write_report
from lowgrad.stages.report import torch_version
from lowgrad.stages.score import read_scores
from lowgrad.store import ChunkedStore
from lowgrad.subspace import GradientSubspace

ROOT = Path(__file__).resolve().parents[1]


def _per_comparison(evidence: dict[str, Any]) -> dict[str, Any]:
    """The numbers a run's own evaluation gives (each metric, interval and comparison), without the family-wise
    readings added since."""
    deltas = {row: {kind: {s: v for s, v in comp.items()} for kind, comp in kinds.items()}
              for row, kinds in evidence["deltas"].items()}
    for kinds in deltas.values():
        for comp in kinds.values():
            comp["mean"] = {m: {k: v for k, v in cell.items() if k in ("delta", "ci", "verdict")}
                            for m, cell in comp["mean"].items()}
    return {"methods": evidence["methods"], "deltas": deltas}


def _differences(new: Any, old: Any, where: str = "") -> list[str]:
    """Where two JSON values differ (floats to 1e-9 relative)."""
    if isinstance(new, dict) and isinstance(old, dict):
        out = [f"{where}/{k}: missing in the run" for k in new if k not in old]
        return out + [d for k in new if k in old for d in _differences(new[k], old[k], f"{where}/{k}")]
    if isinstance(new, list) and isinstance(old, list) and len(new) == len(old):
        return [d for i, (a, b) in enumerate(zip(new, old)) for d in _differences(a, b, f"{where}[{i}]")]
    if isinstance(new, float) and isinstance(old, (int, float)):
        return [] if np.isclose(new, old, rtol=1e-9, atol=1e-12) else [f"{where}: {new} != {old}"]
    return [] if new == old else [f"{where}: {new!r} != {old!r}"]


def _same_method(params, run_params) -> None:
    """Every section but ``scoring`` equal to the run's own: these scores came from that configuration."""
    for section in ("seed", "data", "model", "train", "gradient", "subspace"):
        mine, theirs = getattr(params, section), getattr(run_params, section)
        if mine != theirs:
            raise LowgradError(f"--params-file: '{section}' differs from the run's own params.yaml; these scores were "
                               "not computed with it")


def reevaluate(run: Path, params_file: Path, out: Path) -> dict[str, Any]:
    params = load_params(params_file, scoring=True)
    run_params = load_params(run / PARAMS, scoring=True)
    _same_method(params, run_params)
    metrics_bytes = (run / METRICS).read_bytes()
    old = json.loads(metrics_bytes)
    scores = read_scores(str(run / SCORES))
    evidence = evaluate(scores, params)
    changed = _differences(_per_comparison(evidence), {"methods": old["methods"], "deltas": old["deltas"]})
    if changed:
        raise LowgradError(f"the run's own per-comparison readings are not reproduced ({len(changed)} differ, e.g. "
                           f"{changed[0]}); other scoring settings, or a checkout that evaluates differently: its readings would not be the run's")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    metrics = {**old, **evidence, "reevaluated": {  # what evaluation does not give (accuracies, k-sweep, timings) kept
        "run_metrics_sha256": hashlib.sha256(metrics_bytes).hexdigest(), "by_commit": commit,
        "scoring": params.scoring.model_dump(mode="json"),
        "note": "per-comparison readings equal the run's own (checked); family-wise readings added by this commit"}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    info = {
        "lowgrad": __version__, "torch": torch_version(), "python": platform.python_version(),
        "model": json.loads((run / MODEL_INFO).read_text()),
        "gradient parameters (P)": ChunkedStore.open(run / EXTRACTED.format(name="id_train")).meta["n_params"],
        "samples per set": {name: ChunkedStore.open(run / EXTRACTED.format(name=name)).n_rows
                            for name in params.data.datasets},
    }
    flat = {f"{row}/{s}": v for row, per_set in scores.items() for s, v in per_set.items()}
    ratio = GradientSubspace.load(run / SUBSPACE, lazy=True).explained_variance_ratio_
    write_report(params, metrics, flat, ratio, info, str(out / "report.md"), str(out / "plots"))
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="the finished run's project directory")
    parser.add_argument("--params-file", required=True, type=Path, help="the profile the run used (scoring read here)")
    parser.add_argument("--out", required=True, type=Path, help="folder for metrics.json, report.md and plots/")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        metrics = reevaluate(args.run.resolve(), args.params_file, args.out)
    fw = metrics.get("familywise", {})
    print(f"{args.out}: {fw.get('comparisons', 0)} comparisons per metric; per-comparison readings equal the run's")


if __name__ == "__main__":
    main()
