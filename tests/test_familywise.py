"""Simultaneous (family-wise) intervals over a run's configured comparisons, and the declared primary comparison.

References: the per-comparison percentile interval (a family of one must get it exactly), Sidak's and Bonferroni's
levels for independent members, and the coverage of known means under repeated sampling, with the per-comparison
intervals' family coverage as the negative control."""

from __future__ import annotations

import numpy as np
import pytest

from lowgrad.bootstrap import Bootstrap, counts_from_indices, simultaneous_intervals


def _bootstrap_means(data: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """``m x B`` paired bootstrap replicates of the column means of ``data`` (n x m): one resample of the rows
    serves every column, as one resample of the test images serves every comparison of a run."""
    n = len(data)
    return (counts_from_indices(rng.integers(0, n, (replicates, n))) @ data / n).T


def test_a_family_of_one_gets_exactly_its_per_comparison_interval():
    rng = np.random.default_rng(0)
    for values in (rng.normal(size=1000), np.round(rng.normal(size=1000), 1), rng.normal(size=137)):
        boot = Bootstrap({}, {}, 0.95)
        sim = simultaneous_intervals(values[None, :], 0.95)
        assert sim.alpha == pytest.approx(0.05, rel=1e-12) and sim.intervals == [boot.interval(values)]
    # negative control: two independent members widen both intervals
    pair = rng.normal(size=(2, 1000))
    sim = simultaneous_intervals(pair, 0.95)
    assert sim.alpha < 0.04
    for j in range(2):
        per = Bootstrap({}, {}, 0.95).interval(pair[j])
        assert sim.intervals[j][0] < per[0] and sim.intervals[j][1] > per[1]


def test_identical_members_are_one_comparison():
    values = np.random.default_rng(1).normal(size=1000)
    sim = simultaneous_intervals(np.stack([values] * 4), 0.95)
    assert sim.alpha == pytest.approx(0.05, rel=1e-12) and sim.intervals[0] == sim.intervals[3] == Bootstrap({}, {}, 0.95).interval(values)


def test_independent_members_sit_between_per_comparison_and_bonferroni():
    """Five independent members: the common tail probability is Sidak's (1 - 0.95 ** (1/5) = 1.02 %) within Monte
    Carlo error: below the per-comparison 5 %, not below Bonferroni's 1 % by more than that error; strongly
    correlated members need less correction."""
    m, b = 5, 100_000
    rng = np.random.default_rng(2)
    sim = simultaneous_intervals(rng.normal(size=(m, b)), 0.95)
    sidak, bonferroni = 1 - 0.95 ** (1 / m), 0.05 / m
    # about 1,000 replicates fall in the tails: a relative standard error of about 3 %
    assert sim.alpha == pytest.approx(sidak, rel=0.12)
    assert bonferroni * 0.88 < sim.alpha < 0.05
    assert sim.coverage == pytest.approx(0.95, abs=0.002)
    shared = rng.normal(size=b)
    correlated = np.stack([shared + 0.2 * rng.normal(size=b) for _ in range(m)])
    assert simultaneous_intervals(correlated, 0.95).alpha > 2 * sim.alpha


def test_family_coverage_of_known_means_is_the_level_where_per_comparison_falls_short():
    """Eight correlated means of a known normal, sampled 300 times: the simultaneous intervals cover all eight true
    means in about 95 % of the samples; the per-comparison intervals (the negative control) in far fewer."""
    m, n, trials = 8, 300, 300
    rng = np.random.default_rng(3)
    cov = 0.3 + 0.7 * np.eye(m)
    mean = np.linspace(-1, 1, m)
    chol = np.linalg.cholesky(cov)
    family_hits = per_comparison_hits = 0
    for _ in range(trials):
        data = mean + rng.normal(size=(n, m)) @ chol.T
        reps = _bootstrap_means(data, 1000, rng)
        sim = simultaneous_intervals(reps, 0.95)
        family_hits += all(lo <= mu <= hi for (lo, hi), mu in zip(sim.intervals, mean))
        per = [Bootstrap({}, {}, 0.95).interval(r) for r in reps]
        per_comparison_hits += all(lo <= mu <= hi for (lo, hi), mu in zip(per, mean))
    se = np.sqrt(0.95 * 0.05 / trials)  # 1.3 points
    assert abs(family_hits / trials - 0.95) < 3 * se, family_hits
    assert per_comparison_hits / trials < 0.85 and family_hits - per_comparison_hits > 0.1 * trials


def _params(primary=None):
    from tests.conftest import DIGITS
    from lowgrad.config import parse_params

    scoring = {"forward": {"msp": {}, "knn": {}}, "gradient": {"knn": {}, "msp": {}}, "min_ood_samples": 1,
               "bootstrap": {"replicates": 400},
               "fusion": {"groups": [{"name": "pair", "members": ["msp", "grad_knn"]}]}}
    if primary is not None:
        scoring["primary"] = primary
    return parse_params({
        "data": {"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.5], "datasets": {
            "id_train": {"source": "npz", "path": DIGITS, "classes": [0, 1]},
            "id_test": {"source": "npz", "path": DIGITS, "classes": [0, 1]},
            "a": {"source": "npz", "path": DIGITS, "classes": [7]},
            "b": {"source": "npz", "path": DIGITS, "classes": [8]}}},
        "model": {"arch": "small_cnn", "num_classes": 2},
        "scoring": scoring,
    })


def _scores():
    rng = np.random.default_rng(4)
    shifts = {"msp": 0.6, "knn": 0.8, "grad_knn": 1.1, "grad_msp": 0.7, "fused_pair_forward_only": 0.6, "fused_pair": 0.9}
    return {row: {"id_test": rng.normal(shift, 1, 200), "a": rng.normal(0, 1, 150), "b": rng.normal(0, 1, 150)}
            for row, shift in shifts.items()}


def test_every_reading_gets_a_familywise_interval_and_verdict():
    from lowgrad.bootstrap import verdict
    from lowgrad.comparison import evaluate

    out = evaluate(_scores(), _params())
    fam = out["familywise"]
    # grad_knn vs knn (twin = best forward-only), grad_msp vs msp and vs knn, fused_pair vs its baseline and knn
    assert fam["comparisons"] == 5 and 0 < fam["alpha"]["fpr95"] < 0.05 and out["primary"] is None
    pairs = []
    for row, kinds in out["deltas"].items():
        for comp in kinds.values():
            pairs.append((row, comp["against"]))
            for m in ("fpr95", "auroc"):
                e = comp["mean"][m]
                assert e["ci_familywise"][0] <= e["ci"][0] and e["ci_familywise"][1] >= e["ci"][1]
                assert e["verdict_familywise"] == verdict(e["ci_familywise"], m)
    assert len(set(pairs)) == 5 < len(pairs)  # a pair read twice is one member of the family
    from lowgrad.report import familywise_summary

    summary = familywise_summary(out)
    read = {(row, comp["against"], m): comp["mean"][m] for row, kinds in out["deltas"].items()
            for comp in kinds.values() for m in ("fpr95", "auroc")}
    kept = {k for k, e in read.items() if e["verdict_familywise"] != "no detectable difference"}
    lost = {k for k, e in read.items() if e["verdict_familywise"] == "no detectable difference" != e["verdict"]}
    assert len(summary["better"]) + len(summary["worse"]) == len(kept) and len(summary["lost"]) == len(lost)
    # by hand: a gain read per comparison only is listed as lost, one read at both levels as better
    entry = lambda v, fw: {"delta": -1.0, "ci": [0, 0], "verdict": v, "verdict_familywise": fw}  # noqa: E731
    nd = "no detectable difference"
    hand = {"methods": {}, "deltas": {
        "grad_a": {"twin": {"against": "a", "mean": {"fpr95": entry("better", nd), "auroc": entry(nd, nd)}}},
        "grad_b": {"twin": {"against": "b", "mean": {"fpr95": entry("better", "better"), "auroc": entry("worse", "worse")}}}}}
    hand["methods"] = {r: {"mean": {"fpr95": 0.0}} for r in ("grad_a", "grad_b", "a", "b")}
    hand["rows"] = {r: {"name": r, "kind": "gradient" if r.startswith("grad") else "forward", "gradient": r.startswith("grad"),
                        "label": r, "detector": r.removeprefix("grad_"), "members": [], "twin": None} for r in hand["methods"]}
    assert familywise_summary(hand) == {"better": ["grad_b vs b (FPR95)"], "worse": ["grad_b vs b (AUROC)"],
                                        "lost": ["grad_a vs a (FPR95, better per comparison)"]}


def test_the_primary_comparison_is_read_at_the_nominal_level_and_the_report_says_so():
    from lowgrad.comparison import evaluate
    from lowgrad.report import verdict_rows, verdict_section

    out = evaluate(_scores(), _params({"row": "fused_pair", "baseline": "fused_pair_forward_only"}))
    primary = out["primary"]
    twin = out["deltas"]["fused_pair"]["twin"]
    assert primary["row"] == "fused_pair" and primary["against"] == "fused_pair_forward_only"
    assert primary["mean"]["fpr95"]["ci"] == twin["mean"]["fpr95"]["ci"]  # the nominal (per-comparison) interval
    text = "\n".join(verdict_section(out, plot=False))
    assert "Primary comparison (declared in `scoring.primary` before the run): `fused_pair`" in text
    assert "Every other reading below is secondary" in text and "| family-wise |" in text
    assert all(r["familywise"].startswith("FPR95 [") for r in verdict_rows(out))
    # negative control: without a primary the headline says it is chosen after the fact, with its family-wise reading
    plain = "\n".join(verdict_section(evaluate(_scores(), _params()), plot=False))
    assert "Primary comparison" not in plain and "chosen after the fact" in plain and "Family-wise (5 comparisons)" in plain


@pytest.mark.parametrize("primary, message", [
    ({"row": "knn", "baseline": "msp"}, r"scoring.primary.row: 'knn' is not a configured row that uses the gradient"),
    ({"row": "grad_knn", "baseline": "grad_msp"}, r"scoring.primary.baseline: 'grad_msp' is not a configured forward-only"),
    ({"row": "grad_knn"}, r"baseline"),
])
def test_a_primary_comparison_names_configured_rows(primary, message):
    from lowgrad.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        _params(primary)
