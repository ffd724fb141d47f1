"""OOD metrics (docs/method.md section 8). Convention: ID is the positive class and higher score = more ID.

AUROC and average precision are scikit-learn's (``roc_auc_score``, ``average_precision_score``: ties included),
tested against pairwise and threshold loops; FPR at 95 % TPR is the paper's threshold rule, below. Values are
fractions; :func:`ood_metrics` reports percent.
"""

from __future__ import annotations

import numpy as np


def _as_1d(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("empty score array")
    if not np.isfinite(x).all():
        raise ValueError("scores contain NaN or infinity")
    return x


def _labelled(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.concatenate([pos, neg])


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under the ROC curve = P(score_ID > score_OOD) + 0.5 P(tie) (scikit-learn's ``roc_auc_score``)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(*_labelled(_as_1d(id_scores), _as_1d(ood_scores))))


def average_precision(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """Step-wise AP, ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds (scikit-learn's
    ``average_precision_score``)."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(*_labelled(_as_1d(pos_scores), _as_1d(neg_scores))))


def tpr_threshold(pos_scores: np.ndarray, tpr: float = 0.95) -> float:
    """The largest threshold that keeps ``tpr`` of the positives at or above it (a sample below it is flagged)."""
    pos = np.sort(_as_1d(pos_scores))[::-1]
    percent = round(tpr * 100)
    need = -(-percent * len(pos) // 100)  # ceil(tpr * n) in integers: no float rounding at exact counts
    return float(pos[need - 1])


def fpr_at_tpr(pos_scores: np.ndarray, neg_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of negatives scoring at or above the largest threshold that keeps ``tpr`` of positives."""
    return float(np.mean(_as_1d(neg_scores) >= tpr_threshold(pos_scores, tpr)))


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """All metrics for one OOD set, in percent.

    ``fpr95``: ID positive (the paper's); ``fpr95_ood_pos``: OOD positive (OpenOOD's / pytorch-ood's).
    """
    id_scores, ood_scores = _as_1d(id_scores), _as_1d(ood_scores)
    return {
        "fpr95": 100.0 * fpr_at_tpr(id_scores, ood_scores),
        "fpr95_ood_pos": 100.0 * fpr_at_tpr(-ood_scores, -id_scores),
        "auroc": 100.0 * auroc(id_scores, ood_scores),
        "aupr_in": 100.0 * average_precision(id_scores, ood_scores),
        "aupr_out": 100.0 * average_precision(-ood_scores, -id_scores),
    }


def mean_metrics(per_set: dict[str, dict[str, float]]) -> dict[str, float]:
    """Plain mean over OOD sets, metric by metric."""
    keys = next(iter(per_set.values())).keys()
    return {k: float(np.mean([m[k] for m in per_set.values()])) for k in keys}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float(100.0 * np.mean(np.asarray(logits).argmax(axis=1) == np.asarray(labels)))
