"""Fusion of any number of detectors on a common scale (docs/method.md section 7).

Each member's scores are calibrated on held-out ID data (a random part of ``id_train`` that no member was
fitted on), then combined with equal weights:

- ``zscore``: the sum of ``(s - mean_cal) / std_cal``;
- ``fisher``: Fisher's method on ID p-values. A member's p-value is the conformal ID p-value
  ``p = (1 + #{cal <= s}) / (n_cal + 1)`` (small = unlike ID); Fisher's statistic ``-2 sum log p`` is large
  for OOD, so the fused ID score is ``sum log p``.
"""

from __future__ import annotations

import numpy as np

RULES = ("zscore", "fisher")


class ScoreCalibrator:
    """Maps one detector's scores to a common scale fitted on held-out ID scores: ``zscore`` or ``pvalue``."""

    def __init__(self, rule: str) -> None:
        if rule not in ("zscore", "pvalue"):
            raise ValueError(f"calibration rule must be 'zscore' or 'pvalue', got {rule!r}")
        self.rule = rule

    def fit(self, calibration_scores: np.ndarray) -> "ScoreCalibrator":
        s = np.sort(np.asarray(calibration_scores, dtype=np.float64))
        self.sorted_ = s
        self.mean_, self.std_ = float(s.mean()), float(s.std())
        if self.rule == "zscore" and self.std_ == 0:
            raise ValueError("calibration scores are constant: cannot standardise")
        return self

    def transform(self, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64)
        if self.rule == "zscore":
            return (scores - self.mean_) / self.std_
        return (1.0 + np.searchsorted(self.sorted_, scores, side="right")) / (len(self.sorted_) + 1.0)


def fuse(calibration: list[np.ndarray], scores: list[np.ndarray], rule: str) -> np.ndarray:
    """Equal-weight fusion of several members: ``calibration[i]`` and ``scores[i]`` are member ``i``'s scores on
    the held-out ID rows and on the set to fuse."""
    if rule not in RULES:
        raise ValueError(f"fusion rule must be one of {RULES}, got {rule!r}")
    if not scores or len(calibration) != len(scores):
        raise ValueError("fusion needs one calibration array per member and at least one member")
    if rule == "zscore":
        return sum(ScoreCalibrator("zscore").fit(c).transform(s) for c, s in zip(calibration, scores))
    return sum(np.log(ScoreCalibrator("pvalue").fit(c).transform(s)) for c, s in zip(calibration, scores))
