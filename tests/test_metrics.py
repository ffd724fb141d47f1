"""Metrics against scikit-learn (ties included) and hand-computed FPR95."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from lowgrad.metrics import accuracy, auroc, average_precision, fpr_at_tpr, mean_metrics, ood_metrics


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_auroc_and_aupr_match_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    id_s, ood_s = rng.normal(1, 1, 300 + seed * 37), rng.normal(0, 1, 200 + seed * 11)
    if ties:
        id_s, ood_s = np.round(id_s * 2) / 2, np.round(ood_s * 2) / 2  # many exact ties, across classes too
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    s = np.r_[id_s, ood_s]
    assert abs(auroc(id_s, ood_s) - roc_auc_score(y, s)) < 1e-9
    assert abs(average_precision(id_s, ood_s) - average_precision_score(y, s)) < 1e-9
    assert abs(average_precision(-ood_s, -id_s) - average_precision_score(1 - y, -s)) < 1e-9


@pytest.mark.parametrize("seed", range(4))
def test_fpr95_matches_roc_curve(seed):
    rng = np.random.default_rng(seed)
    id_s, ood_s = np.round(rng.normal(1, 1, 257), 1), np.round(rng.normal(0, 1, 131), 1)
    fpr, tpr, _ = roc_curve(np.r_[np.ones(257), np.zeros(131)], np.r_[id_s, ood_s], drop_intermediate=False)
    assert fpr_at_tpr(id_s, ood_s) == pytest.approx(fpr[np.searchsorted(tpr, 0.95, side="left")], abs=1e-12)


def test_fpr95_hand_computed():
    id_s = np.arange(1, 101, dtype=float)  # keep 95 of 100 -> threshold 6
    ood_s = np.array([0.0, 5.9, 6.0, 50.0, 101.0])  # 6.0, 50 and 101 pass
    assert fpr_at_tpr(id_s, ood_s) == pytest.approx(3 / 5)
    m = ood_metrics(id_s, ood_s)
    assert m["fpr95"] == pytest.approx(60.0)
    # OOD positive: threshold keeps 95 % of OOD flagged (OOD scores <= 101 -> every ID sample flagged)
    assert m["fpr95_ood_pos"] == pytest.approx(100.0)


def test_perfect_and_reversed_separation():
    m = ood_metrics(np.array([2.0, 3.0, 4.0]), np.array([0.0, 1.0]))
    assert m["auroc"] == 100 and m["fpr95"] == 0 and m["aupr_in"] == 100 and m["aupr_out"] == 100
    assert ood_metrics(np.array([0.0, 1.0]), np.array([2.0, 3.0]))["auroc"] == 0


def test_mean_and_accuracy_and_bad_input():
    assert mean_metrics({"a": {"x": 1.0}, "b": {"x": 3.0}}) == {"x": 2.0}
    assert accuracy(np.array([[0.1, 0.9], [2.0, 1.0]]), np.array([1, 1])) == 50.0
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([np.nan]), np.array([1.0]))


def test_report_roc_points_equal_a_threshold_loop():
    from lowgrad.report import _roc_points

    rng = np.random.default_rng(4)
    id_s, ood_s = np.round(rng.normal(1, 1, 80), 1), np.round(rng.normal(0, 1, 60), 1)
    fpr, tpr = _roc_points(id_s, ood_s)
    thresholds = np.unique(np.concatenate([id_s, ood_s]))[::-1]
    np.testing.assert_array_equal(tpr, np.r_[0.0, [(id_s >= t).mean() for t in thresholds]])
    np.testing.assert_array_equal(fpr, np.r_[0.0, [(ood_s >= t).mean() for t in thresholds]])
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(id_s, ood_s), abs=1e-12)  # the curve's area is the AUROC
