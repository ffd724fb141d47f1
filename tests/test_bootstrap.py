"""The vectorised paired bootstrap against a loop over replicates and against scipy.stats.bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from lowgrad.bootstrap import (
    METRICS, Bootstrap, counts_from_indices, draw_indices, metrics_from_counts, verdict,
)
from lowgrad.metrics import auroc, ood_metrics


def _scores(seed: int, n_id: int = 150, n_ood: int = 120, shift: float = 1.0, decimals: int = 1):
    rng = np.random.default_rng(seed)
    # rounded: many ties inside and across the two sets
    return np.round(rng.normal(shift, 1.0, n_id), decimals), np.round(rng.normal(0.0, 1.0, n_ood), decimals)


def test_counts_match_the_drawn_indices():
    idx = draw_indices(50, 30, seed=1, name="id_test")
    counts = counts_from_indices(idx)
    assert counts.shape == (30, 50) and (counts.sum(1) == 50).all()
    for b in range(30):
        np.testing.assert_array_equal(counts[b], np.bincount(idx[b], minlength=50))


@pytest.mark.parametrize("decimals", [1, 6])
def test_vectorised_metrics_equal_a_loop_over_replicates(decimals):
    """Every metric of every replicate equals ood_metrics on the resampled arrays (ties included)."""
    id_s, ood_s = _scores(0, decimals=decimals)
    idx_id, idx_ood = draw_indices(len(id_s), 300, 7, "id_test"), draw_indices(len(ood_s), 300, 7, "ood")
    got = metrics_from_counts(id_s, ood_s, counts_from_indices(idx_id), counts_from_indices(idx_ood))
    for b in range(300):
        want = ood_metrics(id_s[idx_id[b]], ood_s[idx_ood[b]])
        for m in METRICS:
            assert got[m][b] == pytest.approx(want[m], abs=1e-9), (m, b)


def test_percentile_interval_agrees_with_scipy_bootstrap():
    """Same statistic (AUROC), same resampling scheme (each sample independently), independent random streams:
    the intervals agree to within a small fraction of the bootstrap standard error."""
    id_s, ood_s = _scores(1, 200, 200, shift=0.8, decimals=6)
    boot = Bootstrap.draw({"id_test": 200, "ood": 200}, ["ood"], 4000, seed=0, level=0.95)
    values = boot.replicate_metrics({"id_test": id_s, "ood": ood_s})["ood"]["auroc"] / 100
    ours = boot.interval(values)
    ref = stats.bootstrap((id_s, ood_s), auroc, paired=False, vectorized=False, n_resamples=4000,
                          method="percentile", confidence_level=0.95, random_state=np.random.default_rng(5))
    se = ref.standard_error
    assert np.std(values) == pytest.approx(se, rel=0.1)
    assert abs(ours[0] - ref.confidence_interval.low) < 0.3 * se
    assert abs(ours[1] - ref.confidence_interval.high) < 0.3 * se
    # negative control: a different statistic's interval does not agree
    shifted = stats.bootstrap((id_s + 0.3, ood_s), auroc, paired=False, vectorized=False, n_resamples=500,
                              method="percentile", random_state=np.random.default_rng(5))
    assert abs(ours[0] - shifted.confidence_interval.low) > 0.3 * se


def test_paired_difference_controls():
    """Identical rows: the difference is 0 in every replicate; a clearly better row: the interval excludes 0;
    a re-noised copy of the same detector: no detectable difference."""
    rng = np.random.default_rng(2)
    id_s, ood_s = rng.normal(1.0, 1.0, 400), rng.normal(0.0, 1.0, 400)
    sizes = {"id_test": 400, "ood": 400}
    boot = Bootstrap.draw(sizes, ["ood"], 1000, seed=3, level=0.95)
    base = boot.replicate_metrics({"id_test": id_s, "ood": ood_s})
    same = boot.replicate_metrics({"id_test": id_s.copy(), "ood": ood_s.copy()})
    better = boot.replicate_metrics({"id_test": id_s + 1.5, "ood": ood_s})
    noisy = boot.replicate_metrics({"id_test": id_s + rng.normal(0, 0.05, 400), "ood": ood_s + rng.normal(0, 0.05, 400)})
    for m in ("fpr95", "auroc"):
        diff = boot.interval(same["mean"][m] - base["mean"][m])
        assert diff == [0.0, 0.0] and verdict(diff, m) == "no detectable difference"
        assert verdict(boot.interval(better["mean"][m] - base["mean"][m]), m) == "better"
        assert verdict(boot.interval(base["mean"][m] - better["mean"][m]), m) == "worse"
        assert verdict(boot.interval(noisy["mean"][m] - base["mean"][m]), m) == "no detectable difference"
    # paired beats unpaired: the difference of two correlated rows varies less than either row
    assert np.std(noisy["mean"]["auroc"] - base["mean"]["auroc"]) < 0.5 * np.std(base["mean"]["auroc"])


def test_mean_over_sets_and_stream_independence():
    id_s, ood_a = _scores(3)
    _, ood_b = _scores(4, n_ood=90)
    sizes = {"id_test": len(id_s), "a": len(ood_a), "b": len(ood_b)}
    both = Bootstrap.draw(sizes, ["a", "b"], 200, seed=0, level=0.9)
    only_a = Bootstrap.draw(sizes, ["a"], 200, seed=0, level=0.9)
    np.testing.assert_array_equal(both.ood_counts["a"], only_a.ood_counts["a"])  # keyed by name, not position
    reps = both.replicate_metrics({"id_test": id_s, "a": ood_a, "b": ood_b})
    np.testing.assert_allclose(reps["mean"]["fpr95"], (reps["a"]["fpr95"] + reps["b"]["fpr95"]) / 2)
    lo, hi = both.interval(reps["a"]["auroc"])
    assert np.mean((reps["a"]["auroc"] >= lo) & (reps["a"]["auroc"] <= hi)) == pytest.approx(0.9, abs=0.02)
    other_seed = Bootstrap.draw(sizes, ["a"], 200, seed=1, level=0.9)
    assert not np.array_equal(other_seed.ood_counts["a"], only_a.ood_counts["a"])


def _evaluate_params(min_ood_samples: int):
    from tests.conftest import DIGITS
    from lowgrad.config import parse_params

    return parse_params({
        "data": {"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.5], "datasets": {
            "id_train": {"source": "npz", "path": DIGITS, "classes": [0, 1]},
            "id_test": {"source": "npz", "path": DIGITS, "classes": [0, 1]},
            "big": {"source": "npz", "path": DIGITS, "classes": [7]},
            "tiny": {"source": "npz", "path": DIGITS, "classes": [8]}}},
        "model": {"arch": "small_cnn", "num_classes": 2},
        "scoring": {"forward": {"msp": {}}, "gradient": {"knn": {}}, "min_ood_samples": min_ood_samples,
                    "bootstrap": {"replicates": 200}},
    })


def test_a_set_below_the_minimum_is_reported_alone_and_left_out_of_the_mean():
    """A 1-image OOD set: its own column stays, but the mean (point, replicates, verdicts) is the big set's."""
    from lowgrad.comparison import evaluate

    rng = np.random.default_rng(5)
    scores = {row: {"id_test": rng.normal(1, 1, 150), "big": rng.normal(shift, 1, 120), "tiny": np.array([5.0])}
              for row, shift in (("msp", 0.0), ("grad_knn", -1.0))}
    out = evaluate(scores, _evaluate_params(50))
    assert out["mean_over"] == ["big"] and out["small_sets"] == {"tiny": 1}
    for row in scores:
        table = out["methods"][row]
        assert "tiny" in table  # reported on its own
        assert table["mean"]["fpr95"] == table["big"]["fpr95"] and table["mean"]["ci"] == table["big"]["ci"]
    mean_delta = out["deltas"]["grad_knn"]["best_forward_only"]["mean"]["auroc"]
    assert mean_delta["ci"] == out["deltas"]["grad_knn"]["best_forward_only"]["big"]["auroc"]["ci"]
    # negative control: with the minimum at 1 the tiny set enters the mean, and the mean moves
    with_tiny = evaluate(scores, _evaluate_params(1))
    assert with_tiny["mean_over"] == ["big", "tiny"] and with_tiny["small_sets"] == {}
    assert with_tiny["methods"]["msp"]["mean"]["auroc"] != out["methods"]["msp"]["mean"]["auroc"]


def test_every_set_below_the_minimum_is_one_config_error():
    from lowgrad.comparison import evaluate
    from lowgrad.errors import ConfigError

    scores = {"msp": {"id_test": np.arange(60.0), "big": np.arange(10.0), "tiny": np.array([1.0])}}
    with pytest.raises(ConfigError, match=r"min_ood_samples = 50: every OOD set is smaller \(big: 10, tiny: 1\)"):
        evaluate(scores, _evaluate_params(50))
