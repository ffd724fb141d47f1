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

Intervals are percentile intervals (Efron & Tibshirani 1993, ch. 13) at ``level``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

METRICS = ("fpr95", "fpr95_ood_pos", "auroc", "aupr_in", "aupr_out")
LOWER_IS_BETTER = {"fpr95", "fpr95_ood_pos"}
_BLOCK = 256  # replicates per vectorised block (bounds memory at _BLOCK x (n_id + n_ood) float64)


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


def _fpr_at_tpr(pos: np.ndarray, neg: np.ndarray, cpos: np.ndarray, cneg: np.ndarray, tpr: float = 0.95) -> np.ndarray:
    """:func:`lowgrad.metrics.fpr_at_tpr` for every replicate: the threshold is the largest positive score
    that keeps ``ceil(tpr * n_pos)`` positives; the FPR is the weighted fraction of negatives at or above it."""
    n_pos, n_neg = cpos.shape[1], cneg.shape[1]
    need = -(-round(tpr * 100) * n_pos // 100)
    order = np.argsort(-pos, kind="stable")
    kept = np.cumsum(cpos[:, order], axis=1)
    threshold = pos[order][np.argmax(kept >= need, axis=1)]  # (B,)
    neg_order = np.argsort(neg, kind="stable")
    neg_sorted = neg[neg_order]
    below = np.concatenate([np.zeros((len(cneg), 1)), np.cumsum(cneg[:, neg_order], axis=1)], axis=1)
    first_at_or_above = np.searchsorted(neg_sorted, threshold, side="left")
    return (n_neg - below[np.arange(len(cneg)), first_at_or_above]) / n_neg


def _auroc(pos: np.ndarray, neg: np.ndarray, cpos: np.ndarray, cneg: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC, ``P(pos > neg) + 0.5 P(tie)``, weighted by the counts of every replicate."""
    neg_order = np.argsort(neg, kind="stable")
    neg_sorted = neg[neg_order]
    below = np.concatenate([np.zeros((len(cneg), 1)), np.cumsum(cneg[:, neg_order], axis=1)], axis=1)
    less = below[:, np.searchsorted(neg_sorted, pos, side="left")]  # weighted negatives strictly below each pos
    less_eq = below[:, np.searchsorted(neg_sorted, pos, side="right")]
    wins = np.einsum("bi,bi->b", cpos, less + 0.5 * (less_eq - less))
    return wins / (cpos.shape[1] * cneg.shape[1])


def _average_precision(pos: np.ndarray, neg: np.ndarray, cpos: np.ndarray, cneg: np.ndarray) -> np.ndarray:
    """:func:`lowgrad.metrics.average_precision` (step-wise, over distinct thresholds) for every replicate."""
    scores = np.concatenate([pos, neg])
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    weights_pos = np.concatenate([cpos, np.zeros_like(cneg)], axis=1)[:, order]
    weights_all = np.concatenate([cpos, cneg], axis=1)[:, order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp = np.cumsum(weights_pos, axis=1)[:, last_of_tie]
    seen = np.cumsum(weights_all, axis=1)[:, last_of_tie]
    recall_step = np.diff(np.concatenate([np.zeros((len(tp), 1)), tp], axis=1), axis=1) / cpos.shape[1]
    precision = np.divide(tp, seen, out=np.zeros_like(tp), where=seen > 0)  # an empty group adds no recall
    return np.sum(recall_step * precision, axis=1)


def metrics_from_counts(id_scores: np.ndarray, ood_scores: np.ndarray, cid: np.ndarray, cood: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of :func:`lowgrad.metrics.ood_metrics` (percent) for each replicate's counts."""
    i, o = np.asarray(id_scores, dtype=np.float64), np.asarray(ood_scores, dtype=np.float64)
    out: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    for start in range(0, len(cid), _BLOCK):
        ci, co = cid[start : start + _BLOCK], cood[start : start + _BLOCK]
        out["fpr95"].append(_fpr_at_tpr(i, o, ci, co))
        out["fpr95_ood_pos"].append(_fpr_at_tpr(-o, -i, co, ci))
        out["auroc"].append(_auroc(i, o, ci, co))
        out["aupr_in"].append(_average_precision(i, o, ci, co))
        out["aupr_out"].append(_average_precision(-o, -i, co, ci))
    return {m: 100.0 * np.concatenate(v) for m, v in out.items()}


@dataclass(frozen=True)
class Bootstrap:
    """The replicates of one run: per-sample counts of the ID test set and of each OOD set."""

    id_counts: np.ndarray
    ood_counts: dict[str, np.ndarray]
    level: float

    @classmethod
    def draw(cls, sizes: dict[str, int], ood_names: list[str], replicates: int, seed: int, level: float) -> "Bootstrap":
        """``sizes``: samples per set (``id_test`` and every OOD set)."""
        counts = {n: counts_from_indices(draw_indices(sizes[n], replicates, seed, n)) for n in ["id_test", *ood_names]}
        return cls(counts.pop("id_test"), counts, level)

    def replicate_metrics(self, scores: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        """Per OOD set and ``mean``: each metric's value in every replicate for one row's ``scores[set]``."""
        per_set = {
            s: metrics_from_counts(scores["id_test"], scores[s], self.id_counts, c) for s, c in self.ood_counts.items()
        }
        per_set["mean"] = {m: np.mean([per_set[s][m] for s in self.ood_counts], axis=0) for m in METRICS}
        return per_set

    def interval(self, values: np.ndarray) -> list[float]:
        """Percentile interval of replicate values at this bootstrap's level."""
        tail = 100.0 * (1.0 - self.level) / 2.0
        low, high = np.percentile(values, [tail, 100.0 - tail])
        return [float(low), float(high)]


def verdict(delta_interval: list[float], metric: str) -> str:
    """``better`` / ``worse`` / ``no detectable difference`` for ``row - baseline`` with this interval."""
    low, high = delta_interval
    if low <= 0.0 <= high:
        return "no detectable difference"
    improved = high < 0.0 if metric in LOWER_IS_BETTER else low > 0.0
    return "better" if improved else "worse"
