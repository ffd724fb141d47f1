"""Metrics against loops written from their definitions (ties included), and hand-computed FPR95."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from lowgrad.metrics import accuracy, auroc, average_precision, fpr_at_tpr, mean_metrics, ood_metrics


def _auroc_loop(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(pos > neg) + 0.5 P(pos = neg), over every pair, in float64."""
    wins = sum(float(p > q) + 0.5 * float(p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def _ap_loop(pos: np.ndarray, neg: np.ndarray) -> float:
    """sum over distinct thresholds t (descending) of (recall(t) - recall(previous t)) * precision(t)."""
    total, last_recall = 0.0, 0.0
    for t in np.unique(np.concatenate([pos, neg]))[::-1]:
        tp, fp = float((pos >= t).sum()), float((neg >= t).sum())
        recall = tp / len(pos)
        total += (recall - last_recall) * tp / (tp + fp)
        last_recall = recall
    return total


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ties", [False, True])
def test_auroc_and_aupr_equal_their_definitions(seed, ties):
    rng = np.random.default_rng(seed)
    id_s, ood_s = rng.normal(1, 1, 120 + seed * 37), rng.normal(0, 1, 90 + seed * 11)
    if ties:
        id_s, ood_s = np.round(id_s * 2) / 2, np.round(ood_s * 2) / 2  # many exact ties, across classes too
    assert auroc(id_s, ood_s) == pytest.approx(_auroc_loop(id_s, ood_s), abs=1e-12)
    assert average_precision(id_s, ood_s) == pytest.approx(_ap_loop(id_s, ood_s), abs=1e-12)
    assert average_precision(-ood_s, -id_s) == pytest.approx(_ap_loop(-ood_s, -id_s), abs=1e-12)
    if ties:  # negative control: ties counted as losses (or AP interpolated) would read otherwise
        strict = np.mean(id_s[:, None] > ood_s[None, :])
        assert abs(auroc(id_s, ood_s) - strict) > 1e-3


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


def test_the_published_verdict_is_the_report_s_read_from_metrics_json():
    """The Prefect artifacts are built from metrics.json: one verdict row per paired comparison of the report's
    table, each carrying the metrics' own deltas, and the same section text without the plot link."""
    import json
    from pathlib import Path

    from lowgrad.report import verdict_rows, verdict_section

    root = Path(__file__).resolve().parents[1]
    metrics = json.loads((root / "report/metrics.json").read_text())
    rows = verdict_rows(metrics)
    report = (root / "report/report.md").read_text()
    table = [ln for ln in report.split("## Does the gradient help here?")[1].split("\n## ")[0].splitlines()
             if ln.startswith(("| grad_", "| fused_"))]
    assert len(rows) == len(table) > 0
    for row, line in zip(rows, table):
        assert line.startswith(f"| {row['gradient_row']} | {row['vs']} | {row['baseline']} |")
        kind = "best_forward_only" if row["vs"] == "best forward-only" else "twin"
        mean = metrics["deltas"][row["gradient_row"]][kind]["mean"]
        assert row["delta_fpr95"] == round(mean["fpr95"]["delta"], 2) and row["delta_auroc"] == round(mean["auroc"]["delta"], 2)
    section = "\n".join(verdict_section(metrics, plot=False))
    assert "plots/deltas.png" not in section and "plots/deltas.png" in "\n".join(verdict_section(metrics))
    assert section.strip() in report  # the same text the report holds
