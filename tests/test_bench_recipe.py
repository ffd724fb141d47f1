"""bench.recipe at a toy size beside ../shared: both recipes trained and read, what each result belongs to recorded,
a finished checkpoint reused only by the same settings (another setting is one error line, nothing lost)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import ROOT, shared_file

TINY = ["--set", "data.datasets.id_train.max_samples=48", "--set", "data.datasets.id_test.max_samples=30",
        "--set", "data.datasets.tinyimagenet.max_samples=30", "--set", "data.datasets.textures.max_samples=30",
        "--set", "data.datasets.fashionmnist.max_samples=30", "--set", "subspace.k=6", "--set", "train.batch_size=16",
        "--set", "gradient.batch_size=16", "--set", "scoring.bootstrap.replicates=100", "--set", "scoring.min_ood_samples=20"]


def _main(monkeypatch, args: list[str]) -> None:
    from bench import recipe

    monkeypatch.setattr(sys, "argv", ["bench.recipe", *args])
    # main's logging.basicConfig would leave a root handler on this test's captured stderr, which pytest closes: a
    # later test's log record (a Prefect flow's, printing through its logger) would then fail on it, recursively
    monkeypatch.setattr(recipe.logging, "basicConfig", lambda **kwargs: None)
    recipe.main()


@pytest.mark.slow
def test_both_recipes_are_trained_read_and_kept_with_their_settings(tmp_path, monkeypatch):
    shared_file("models/resnet20-12fca82f.th")  # the profile's sets are in ../shared
    monkeypatch.chdir(ROOT)
    args = ["--epochs", "1", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"), *TINY]
    _main(monkeypatch, args)
    summary = json.loads((tmp_path / "out/recipe.json").read_text())
    plain, authors = summary["results"]["plain"], summary["results"]["authors"]
    assert plain["checkpoint_sha256"] != authors["checkpoint_sha256"]  # SAM + label smoothing moved the weights
    assert authors["trained_from"]["overrides"]["train.sam_rho"] == 0.05
    assert plain["trained_from"]["overrides"]["train.sam_rho"] == 0.0
    for entry in (plain, authors):
        assert entry["test_accuracy"]["images"] == 10_000
        assert entry["protocol"]["samples"]["id_train"] == 48 and entry["protocol"]["verdicts"]
    assert "readings_differing" in summary
    assert (tmp_path / "out/metrics_authors.json").is_file() and (tmp_path / "out/report_plain.md").is_file()

    record = tmp_path / "work/plain/train/trained.json"
    stamp = record.stat().st_mtime_ns
    _main(monkeypatch, [*args, "--recipes", "plain"])  # the same settings: the checkpoint and protocol are reused
    assert record.stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "out/recipe.json").read_text())["results"]["plain"]["protocol"] == plain["protocol"]
    with pytest.raises(SystemExit, match="^error: .*trained with other settings") as err:
        _main(monkeypatch, ["--epochs", "2", *args[2:]])
    assert "\n" not in str(err.value) and record.stat().st_mtime_ns == stamp
