"""Seeded, paired bootstrap of the OOD metrics: confidence intervals for every row and paired differences.

A replicate resamples the ID test set and each OOD set with replacement, independently of each other; the
same replicates (the same resampled indices) serve every detector row, so the difference of two rows is
bootstrapped *paired*: both rows are evaluated on exactly the same resampled images. The mean over OOD sets
of a replicate shares its ID resample across the sets, as the point estimate does.

A resample is held as per-sample counts (how often each image was drawn), and every metric is computed
from sorted scores and cumulative counts for all replicates at once, so the whole bootstrap of a run is a
few array operations per (row, set) instead of ``replicates`` calls of :func:`lowgrad.metrics.ood_metrics`.
The definitions are exactly those of :mod:`lowgrad.metrics` (ties included), tested against a loop over
replicates that calls them on the resampled arrays.

Intervals are percentile intervals (Efron & Tibshirani 1993, ch. 13) at ``level``. A family of comparisons also
gets simultaneous percentile intervals (:func:`simultaneous_intervals`, Mandel & Betensky 2008): every member's
percentile interval at one common, smaller tail probability, chosen so that in ``level`` of the replicates every
member of the family lies inside its interval at once.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

METRICS = ("fpr95", "fpr95_ood_pos", "auroc", "aupr_in", "aupr_out")
LOWER_IS_BETTER = {"fpr95", "fpr95_ood_pos"}
_BLOCK = 128  # replicates per vectorised block (fastest here: its arrays stay in cache; memory _BLOCK x (n_id + n_ood))


def draw_indices(n: int, replicates: int, seed: int, name: str) -> np.ndarray:
    """``replicates x n`` indices drawn with replacement, from a stream keyed by ``seed`` and the set's name
    (so a set's resamples do not depend on which other sets are configured or their order)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return rng.integers(0, n, size=(replicates, n))


def counts_from_indices(indices: np.ndarray) -> np.ndarray:
    """How often each sample was drawn in each replicate (``replicates x n`` float64)."""
    b, n = indices.shape
    flat = (indices + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


class _Counted:
    """One score array and the per-replicate counts of its samples, sorted once: weighted counts of scores
    below / at most any value, for all replicates at once."""

    def __init__(self, scores: np.ndarray, counts: np.ndarray) -> None:
        order = np.argsort(scores, kind="stable")
        self.sorted = scores[order]
        self.n = counts.shape[1]
        self.cum = np.zeros((counts.shape[0], self.n + 1))
        np.cumsum(counts[:, order], axis=1, out=self.cum[:, 1:])

    def below(self, values: np.ndarray) -> np.ndarray:
        """``replicates x len(values)``: weighted count of scores ``< value``."""
        return self.cum[:, np.searchsorted(self.sorted, values, side="left")]

    def at_most(self, values: np.ndarray) -> np.ndarray:
        return self.cum[:, np.searchsorted(self.sorted, values, side="right")]


def _fpr95(pos: _Counted, neg: _Counted, tpr: float = 0.95) -> np.ndarray:
    """:func:`lowgrad.metrics.fpr_at_tpr` for every replicate: the threshold is the largest positive score with
    at least ``ceil(tpr * n_pos)`` positives at or above it; the FPR is the share of negatives at or above it."""
    need = -(-round(tpr * 100) * pos.n // 100)
    values = np.unique(pos.sorted)  # ascending; "at or above" counts fall along it
    at_or_above = pos.n - pos.below(values)
    threshold = values[(at_or_above >= need).sum(axis=1) - 1]
    rows = np.arange(len(threshold))
    return (neg.n - neg.cum[rows, np.searchsorted(neg.sorted, threshold, side="left")]) / neg.n


def _fpr95_negated(pos: _Counted, neg: _Counted, tpr: float = 0.95) -> np.ndarray:
    """:func:`_fpr95` with both score arrays negated (OOD as the positive class), without re-sorting."""
    need = -(-round(tpr * 100) * pos.n // 100)
    values = np.unique(pos.sorted)
    at_most = pos.at_most(values)
    threshold = values[len(values) - (at_most >= need).sum(axis=1)]
    rows = np.arange(len(threshold))
    return neg.cum[rows, np.searchsorted(neg.sorted, threshold, side="right")] / neg.n


def _auroc(pos: _Counted, neg: _Counted) -> np.ndarray:
    """Mann-Whitney AUROC, ``P(pos > neg) + 0.5 P(tie)``, weighted by the counts of every replicate."""
    less, less_eq = neg.below(pos.sorted), neg.at_most(pos.sorted)
    weights = np.diff(pos.cum, axis=1)  # counts in sorted order
    return np.einsum("bi,bi->b", weights, less + 0.5 * (less_eq - less)) / (pos.n * neg.n)


def _average_precisions(id_: _Counted, ood: _Counted) -> tuple[np.ndarray, np.ndarray]:
    """:func:`lowgrad.metrics.average_precision` with ID positive (AUPR-In) and, on negated scores, with OOD
    positive (AUPR-Out), for every replicate: step-wise over the distinct thresholds."""
    values = np.unique(np.concatenate([id_.sorted, ood.sorted]))  # ascending
    zero = np.zeros((id_.cum.shape[0], 1))
    out = []
    for tp, fp, n_pos, descending in (
        (id_.n - id_.below(values), ood.n - ood.below(values), id_.n, True),  # ID positive: "score >= t"
        (ood.at_most(values), id_.at_most(values), ood.n, False),  # OOD positive on -score: "score <= t"
    ):
        if descending:  # thresholds from the highest down: the previous threshold is the next column
            previous = np.concatenate([tp[:, 1:], zero], axis=1)
        else:
            previous = np.concatenate([zero, tp[:, :-1]], axis=1)
        seen = tp + fp
        precision = np.divide(tp, seen, out=np.zeros_like(tp), where=seen > 0)  # an empty step adds no recall
        out.append(np.sum((tp - previous) * precision, axis=1) / n_pos)
    return out[0], out[1]


def metrics_from_counts(id_scores: np.ndarray, ood_scores: np.ndarray, cid: np.ndarray, cood: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of :func:`lowgrad.metrics.ood_metrics` (percent) for each replicate's counts."""
    i, o = np.asarray(id_scores, dtype=np.float64), np.asarray(ood_scores, dtype=np.float64)
    out: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    for start in range(0, len(cid), _BLOCK):
        id_, ood = _Counted(i, cid[start : start + _BLOCK]), _Counted(o, cood[start : start + _BLOCK])
        aupr_in, aupr_out = _average_precisions(id_, ood)
        for name, values in (("fpr95", _fpr95(id_, ood)), ("fpr95_ood_pos", _fpr95_negated(ood, id_)),
                             ("auroc", _auroc(id_, ood)), ("aupr_in", aupr_in), ("aupr_out", aupr_out)):
            out[name].append(values)
    return {m: 100.0 * np.concatenate(v) for m, v in out.items()}


@dataclass(frozen=True)
class Bootstrap:
    """The replicates of one run: per-sample counts of the ID test set and of each OOD set."""

    id_counts: np.ndarray
    ood_counts: dict[str, np.ndarray]
    level: float
    mean_over: tuple[str, ...] = ()  # the OOD sets averaged into ``mean`` (all of them when empty)

    @classmethod
    def draw(cls, sizes: dict[str, int], ood_names: list[str], replicates: int, seed: int, level: float,
             mean_over: list[str] | None = None) -> "Bootstrap":
        """``sizes``: samples per set (``id_test`` and every OOD set); ``mean_over``: the sets the mean averages."""
        counts = {n: counts_from_indices(draw_indices(sizes[n], replicates, seed, n)) for n in ["id_test", *ood_names]}
        return cls(counts.pop("id_test"), counts, level, tuple(mean_over if mean_over is not None else ood_names))

    def replicate_metrics(self, scores: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        """Per OOD set and ``mean``: each metric's value in every replicate for one row's ``scores[set]``."""
        per_set = {
            s: metrics_from_counts(scores["id_test"], scores[s], self.id_counts, c) for s, c in self.ood_counts.items()
        }
        mean_over = self.mean_over or tuple(self.ood_counts)
        per_set["mean"] = {m: np.mean([per_set[s][m] for s in mean_over], axis=0) for m in METRICS}
        return per_set

    def interval(self, values: np.ndarray) -> list[float]:
        """Percentile interval of replicate values at this bootstrap's level."""
        tail = 100.0 * (1.0 - self.level) / 2.0
        low, high = np.percentile(values, [tail, 100.0 - tail])
        return [float(low), float(high)]


@dataclass(frozen=True)
class Simultaneous:
    """Simultaneous intervals of a family: ``intervals[j]`` for member ``j``, the common two-sided tail
    probability ``alpha`` of each (``1 - level`` for a family of one), and the share of replicates in which every
    member lies inside its interval (``coverage``)."""

    intervals: list[list[float]]
    alpha: float
    coverage: float


def simultaneous_intervals(replicates: np.ndarray, level: float, iterations: int = 30) -> Simultaneous:
    """Simultaneous percentile intervals for a family of ``m`` statistics from ``m x B`` paired bootstrap
    replicates (Mandel & Betensky 2008, Comput. Stat. Data Anal. 52: 2158-2165): each member's interval is its
    percentile interval at a common tail probability ``alpha``, the largest for which the replicates that lie
    inside every member's interval at once are at least the share a single member's interval at ``1 - level``
    holds (``level`` up to the replicates' discreteness). ``alpha`` never exceeds ``1 - level``, so a family of
    one gets exactly its per-comparison interval, and a member's simultaneous interval is never narrower than
    its per-comparison one. Being computed from the joint replicates, it adapts to the members' correlation: for
    independent members it is close to Sidak's ``1 - level**(1/m)``, for identical ones it is ``1 - level``."""
    reps = np.atleast_2d(np.asarray(replicates, dtype=np.float64))
    nominal = 1.0 - level

    def bounds(alpha: float) -> tuple[np.ndarray, np.ndarray]:
        tail = 100.0 * alpha / 2.0  # as Bootstrap.interval spells it: a family of one gets its very numbers
        low, high = np.percentile(reps, [tail, 100.0 - tail], axis=1)
        return low, high

    def inside(alpha: float) -> np.ndarray:  # m x B: replicate b of member j inside member j's interval
        low, high = bounds(alpha)
        return (reps >= low[:, None]) & (reps <= high[:, None])

    # the share a single member's own percentile interval holds (level, up to discreteness and ties)
    target = min(level, float(inside(nominal).mean(axis=1).min()))
    covered = lambda alpha: float(inside(alpha).all(axis=0).mean())  # noqa: E731
    if covered(nominal) >= target:
        alpha = nominal
    else:  # coverage falls as alpha grows: the largest alpha that still holds the target, by bisection
        lo, hi = 0.0, nominal  # covered(0) = 1: every interval spans its replicates' range
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if covered(mid) >= target else (lo, mid)
        alpha = lo
    low, high = bounds(alpha)
    return Simultaneous([[float(a), float(b)] for a, b in zip(low, high)], float(alpha), covered(alpha))


def verdict(delta_interval: list[float], metric: str) -> str:
    """``better`` / ``worse`` / ``no detectable difference`` for ``row - baseline`` with this interval."""
    low, high = delta_interval
    if low <= 0.0 <= high:
        return "no detectable difference"
    improved = high < 0.0 if metric in LOWER_IS_BETTER else low > 0.0
    return "better" if improved else "worse"
