"""Does the gradient help? Metrics with bootstrap intervals for every row, and paired differences of every
row that uses the gradient against its forward baselines.

Rows that *use the gradient*: ``grad_<name>`` and fusion groups with a gradient member. *Forward-only* rows:
forward detectors and fusion groups without a gradient member (``fused_<group>_forward_only`` among them).
Each gradient row is compared with

- its **twin**: the same detector without the gradient (``grad_knn`` -> ``knn``), or, for a fusion group,
  the same group without its gradient members (``fused_<group>_forward_only``);
- the **best forward-only row** of the run, chosen by mean FPR95 (the lowest point estimate). Choosing it on
  the test sets favours the baseline, so a gain over it is conservative.

The mean is over the OOD sets with at least ``scoring.min_ood_samples`` images (:func:`sets_in_mean`); smaller
sets keep their own columns, intervals and per-set differences in ``metrics.json`` but enter neither the mean nor
the report's verdicts (which read the mean).

Differences are ``row - baseline`` per replicate (paired: the same resampled images), in metric points; for
FPR95 negative is better, for AUROC / AUPR positive is better.

The configured comparisons of a run form one **family** per metric: every distinct (gradient row, baseline) pair on
the mean over sets. Besides its per-comparison interval, each gets a simultaneous interval over its family from the
same replicates (:func:`lowgrad.bootstrap.simultaneous_intervals`) and a family-wise verdict: with 95 % the
family-wise readings are all right at once, where about one in twenty per-comparison readings may be wrong by
chance. ``scoring.primary`` declares one comparison before the run, read at the nominal level (``primary``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from lowgrad.bootstrap import METRICS, Bootstrap, simultaneous_intervals, verdict
from lowgrad.config import Params
from lowgrad.errors import ConfigError
from lowgrad.metrics import mean_metrics, ood_metrics
from lowgrad.rows import Row

Scores = dict[str, dict[str, np.ndarray]]  # row -> set -> scores


def sets_in_mean(sizes: dict[str, int], ood: list[str], minimum: int) -> list[str]:
    """The OOD sets with at least ``minimum`` images (``scoring.min_ood_samples``): the mean over sets and every
    verdict use only these; smaller sets are reported on their own. None left is a :class:`ConfigError`."""
    kept = [s for s in ood if sizes[s] >= minimum]
    if not kept:
        raise ConfigError(f"scoring.min_ood_samples = {minimum}: every OOD set is smaller "
                          f"({', '.join(f'{s}: {sizes[s]}' for s in ood)}); add images or lower the minimum")
    return kept


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


def add_familywise(deltas: dict[str, Any], reps: dict[str, dict[str, dict[str, np.ndarray]]],
                   level: float) -> dict[str, Any]:
    """Give every comparison's mean difference a simultaneous interval over its family (``ci_familywise``) and a
    reading at it (``verdict_familywise``), in place; returns the families' sizes and common tail probabilities.
    A pair compared twice (the twin is also the best forward-only row) is one member of the family."""
    pairs = sorted({(row, comp["against"]) for row, kinds in deltas.items() for comp in kinds.values()})
    summary: dict[str, Any] = {"method": "simultaneous percentile bootstrap (Mandel & Betensky 2008): every "
                               "comparison's percentile interval at one common tail probability alpha, chosen so that "
                               f"in {100 * level:g} % of the paired replicates every comparison of the family lies "
                               "inside its interval at once", "level": level, "comparisons": len(pairs), "alpha": {}}
    if not pairs:
        return summary
    for m in METRICS:
        family = np.stack([reps[row]["mean"][m] - reps[base]["mean"][m] for row, base in pairs])
        sim = simultaneous_intervals(family, level)
        summary["alpha"][m] = sim.alpha
        by_pair = dict(zip(pairs, sim.intervals))
        for row, kinds in deltas.items():
            for comp in kinds.values():
                entry = comp["mean"][m]
                entry["ci_familywise"] = by_pair[(row, comp["against"])]
                entry["verdict_familywise"] = verdict(entry["ci_familywise"], m)
    return summary


def evaluate(scores: Scores, params: Params) -> dict[str, Any]:
    """``methods`` (every metric per set and mean, with ``ci`` beside the values), ``deltas`` (per gradient row:
    ``twin`` and ``best_forward_only`` comparisons), ``best_forward_only`` and the ``bootstrap`` settings."""
    ood = params.data.ood_names
    cfg = params.scoring.bootstrap
    started = time.perf_counter()
    sizes = {s: len(v) for s, v in next(iter(scores.values())).items()}
    mean_over = sets_in_mean(sizes, ood, params.scoring.min_ood_samples)
    boot = Bootstrap.draw(sizes, ood, cfg.replicates, cfg.seed, cfg.level, mean_over)
    methods: dict[str, Any] = {}
    reps: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for row, per_set in scores.items():
        table = {s: ood_metrics(per_set["id_test"], per_set[s]) for s in ood}
        table["mean"] = mean_metrics({s: table[s] for s in mean_over})
        reps[row] = boot.replicate_metrics(per_set)
        for s, values in table.items():
            values["ci"] = {m: boot.interval(reps[row][s][m]) for m in METRICS}
        methods[row] = table
    rows: dict[str, Row] = {name: row for name, row in params.scoring.rows().items() if name in scores}
    forward_only = [r for r in scores if not rows[r].gradient]
    best = min(forward_only, key=lambda r: methods[r]["mean"]["fpr95"]) if forward_only else None
    deltas: dict[str, Any] = {}
    for name, row in rows.items():
        if not row.gradient:
            continue
        deltas[name] = {}
        if row.twin is not None:
            deltas[name]["twin"] = _paired(reps, methods, name, row.twin, boot)
        if best is not None:
            deltas[name]["best_forward_only"] = _paired(reps, methods, name, best, boot)
    familywise = add_familywise(deltas, reps, cfg.level)
    primary = None
    if params.scoring.primary is not None:
        row, base = params.scoring.primary.row, params.scoring.primary.baseline
        if row not in scores or base not in scores:
            raise ConfigError(f"scoring.primary: {row} vs {base}: "
                              f"{row if row not in scores else base} was not scored in this run")
        primary = {"row": row, **_paired(reps, methods, row, base, boot)}
    return {
        "rows": {name: row.as_dict() for name, row in rows.items()},
        "methods": methods, "deltas": deltas, "best_forward_only": best, "mean_over": mean_over,
        "familywise": familywise, "primary": primary,
        "small_sets": {s: sizes[s] for s in ood if s not in mean_over},
        "bootstrap": {**cfg.model_dump(), "interval": "percentile", "resampling": "ID test and each OOD set "
                      "independently, with replacement; paired across rows", "wall_s": round(time.perf_counter() - started, 2)},
    }
