"""``bench.estimator`` (issue 37's benchmark) on the session's tiny finished run: it runs the stages, the in-memory
estimator and the work-directory estimator (a fresh fit, then one that reuses its stores), checks every score
against the stages' and writes the timings and ratios; scores that differ fail it (negative control)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest


@pytest.mark.slow  # the tiny run's stages and three estimator fits
def test_the_benchmark_runs_checks_scores_and_writes_its_ratios(tiny_finished, tmp_path, monkeypatch):
    from bench import estimator

    out = tmp_path / "estimator.json"
    monkeypatch.setattr(sys, "argv", ["bench.estimator", "--run", str(tiny_finished), "--repeats", "1", "--out", str(out)])
    estimator.main()
    result = json.loads(out.read_text())
    for key in ("pipeline_s", "estimator_s", "estimator_work_dir_s", "estimator_reuse_s"):
        assert result[key] > 0, key
    assert result["ratio"] == pytest.approx(result["pipeline_s"] / result["estimator_s"])
    assert result["ratio_work_dir"] == pytest.approx(result["pipeline_s"] / result["estimator_work_dir_s"])
    assert set(result["pipeline_stages_s"]) >= {"factors", "subspace", "score"}

    real = estimator.estimator_once

    def shifted(run, work_dir=None):  # the estimator's scores off by 1e-3: the bench must refuse them
        took, scores = real(run, work_dir)
        return took, {name: {row: s + 1e-3 * np.abs(s).max() for row, s in rows.items()} for name, rows in scores.items()}

    monkeypatch.setattr(estimator, "estimator_once", shifted)
    with pytest.raises(AssertionError, match="memory: "):
        estimator.main()
