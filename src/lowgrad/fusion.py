"""Forward + gradient score fusion on a common scale (METHOD.md section 5, last item).

Both scores are calibrated on held-out ID data (a random part of ``id_train`` that neither base detector
was fitted on), then added: ``fused = cal_f(s_forward) + weight * cal_g(s_gradient)``.

- ``zscore``: ``(s - mean_cal) / std_cal``;
- ``pvalue``: the ID-empirical p-value, the fraction of calibration scores <= s (in [0, 1]).
"""

from __future__ import annotations

import numpy as np


class ScoreCalibrator:
    def __init__(self, rule: str = "zscore") -> None:
        if rule not in ("zscore", "pvalue"):
            raise ValueError(f"fusion rule must be 'zscore' or 'pvalue', got {rule!r}")
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
        return np.searchsorted(self.sorted_, scores, side="right") / len(self.sorted_)


def fuse(
    forward_cal: np.ndarray, gradient_cal: np.ndarray, forward: np.ndarray, gradient: np.ndarray,
    rule: str = "zscore", weight: float = 1.0,
) -> np.ndarray:
    """Calibrate each score on its own calibration scores, then add (gradient side times ``weight``)."""
    f = ScoreCalibrator(rule).fit(forward_cal).transform(forward)
    g = ScoreCalibrator(rule).fit(gradient_cal).transform(gradient)
    return f + weight * g
