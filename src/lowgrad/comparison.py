"""Does the gradient help? Metrics with bootstrap intervals for every row, and paired differences of every
row that uses the gradient against its forward baselines.

Rows that *use the gradient*: ``grad_<name>`` and fusion groups with a gradient member. *Forward-only* rows:
forward detectors and fusion groups without a gradient member (``fused_<group>_forward_only`` among them).
Each gradient row is compared with

- its **twin**: the same detector without the gradient (``grad_knn`` -> ``knn``), or, for a fusion group,
  the same group without its gradient members (``fused_<group>_forward_only``);
- the **best forward-only row** of the run, chosen by mean FPR95 (the lowest point estimate). Choosing it on
  the test sets favours the baseline, so a gain over it is conservative.

Differences are ``row - baseline`` per replicate (paired: the same resampled images), in metric points; for
FPR95 negative is better, for AUROC / AUPR positive is better.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from lowgrad.bootstrap import METRICS, Bootstrap, verdict
from lowgrad.config import Params, member_detector
from lowgrad.metrics import mean_metrics, ood_metrics
from lowgrad.scoring import fusion_plan

Scores = dict[str, dict[str, np.ndarray]]  # row -> set -> scores


def row_roles(rows: list[str], params: Params) -> dict[str, tuple[bool, str | None]]:
    """Per row: ``(uses the gradient, its twin row or None)``."""
    roles: dict[str, tuple[bool, str | None]] = {}
    for row in rows:
        if not row.startswith("fused_"):
            base, gradient = member_detector(row)
            roles[row] = (gradient, base if gradient and base in rows else None)
    for label, (members, _, twin) in fusion_plan(params.scoring.fusion.groups).items():
        roles[label] = (any(member_detector(m)[1] for m in members), twin)
    return roles


def _paired(reps: dict[str, dict[str, dict[str, np.ndarray]]], methods: dict[str, Any], row: str, base: str,
            boot: Bootstrap) -> dict[str, Any]:
    """``row - base`` per set and for the mean: point difference, paired interval and verdict, per metric."""
    out: dict[str, Any] = {"against": base}
    for s in reps[row]:
        out[s] = {}
        for m in METRICS:
            interval = boot.interval(reps[row][s][m] - reps[base][s][m])
            out[s][m] = {"delta": methods[row][s][m] - methods[base][s][m], "ci": interval, "verdict": verdict(interval, m)}
    return out


def evaluate(scores: Scores, params: Params) -> dict[str, Any]:
    """``methods`` (every metric per set and mean, with ``ci`` beside the values), ``deltas`` (per gradient row:
    ``twin`` and ``best_forward_only`` comparisons), ``best_forward_only`` and the ``bootstrap`` settings."""
    ood = params.data.ood_names
    cfg = params.scoring.bootstrap
    started = time.perf_counter()
    sizes = {s: len(v) for s, v in next(iter(scores.values())).items()}
    boot = Bootstrap.draw(sizes, ood, cfg.replicates, cfg.seed, cfg.level)
    methods: dict[str, Any] = {}
    reps: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for row, per_set in scores.items():
        table = {s: ood_metrics(per_set["id_test"], per_set[s]) for s in ood}
        table["mean"] = mean_metrics(table)
        reps[row] = boot.replicate_metrics(per_set)
        for s, values in table.items():
            values["ci"] = {m: boot.interval(reps[row][s][m]) for m in METRICS}
        methods[row] = table
    roles = row_roles(list(scores), params)
    forward_only = [r for r in scores if not roles[r][0]]
    best = min(forward_only, key=lambda r: methods[r]["mean"]["fpr95"]) if forward_only else None
    deltas: dict[str, Any] = {}
    for row, (uses_gradient, twin) in roles.items():
        if not uses_gradient:
            continue
        deltas[row] = {}
        if twin is not None:
            deltas[row]["twin"] = _paired(reps, methods, row, twin, boot)
        if best is not None:
            deltas[row]["best_forward_only"] = _paired(reps, methods, row, best, boot)
    return {
        "methods": methods, "deltas": deltas, "best_forward_only": best,
        "bootstrap": {**cfg.model_dump(), "interval": "percentile", "resampling": "ID test and each OOD set "
                      "independently, with replacement; paired across rows", "wall_s": round(time.perf_counter() - started, 2)},
    }
