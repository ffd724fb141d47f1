"""Files and folders replaced whole (``lowgrad.paths.atomic_path`` / ``atomic_dir``): the previous one survives
an error or Ctrl-C inside the block, the staging copy is removed, and a reader finds one or the other."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from lowgrad import paths
from lowgrad.paths import atomic_dir, atomic_path


def _folder(path, text: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "a.txt").write_text(text)
    (path / "b.txt").write_text(text)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_folder_is_replaced_only_when_complete(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(paths, "_exchange", lambda a, b: False)
    target = tmp_path / "detector"
    with atomic_dir(target) as staging:  # the first one: nothing to replace
        _folder(staging, "one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detector"] and (target / "a.txt").read_text() == "one"
    for failure in (RuntimeError("failed"), KeyboardInterrupt()):
        with pytest.raises(type(failure)):
            with atomic_dir(target) as staging:
                _folder(staging, "half")
                raise failure
        assert sorted(p.name for p in tmp_path.iterdir()) == ["detector"]  # staging removed
        assert [(target / n).read_text() for n in ("a.txt", "b.txt")] == ["one", "one"]
    with atomic_dir(target) as staging:
        _folder(staging, "two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detector"]  # neither the staging nor the old folder left
    assert [(target / n).read_text() for n in ("a.txt", "b.txt")] == ["two", "two"]


def test_a_file_is_replaced_only_when_complete(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_staging_of_a_killed_run_is_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / f".detector.new-{int(dead.stdout)}"  # that process has exited
    live = tmp_path / f".detector.new-{os.getppid()}"  # another process, still running, writing its own
    _folder(killed, "x"), _folder(live, "y")
    with atomic_dir(tmp_path / "detector") as staging:
        _folder(staging, "new")
    assert not killed.exists() and live.exists()


def test_a_reader_always_finds_a_whole_folder_while_it_is_replaced(tmp_path):
    """Replaced 300 times while another thread reads it: with the one-step exchange every read finds the folder and
    its files (where the filesystem offers the exchange; skipped otherwise). A reader that needs its files from one
    version checks them against each other, as ``OODDetector.load`` does with detector.json's digests."""
    target = tmp_path / "detector"
    _folder(target, "0")
    probe_a, probe_b = tmp_path / "x", tmp_path / "y"
    probe_a.mkdir(), probe_b.mkdir()
    if not paths._exchange(probe_a, probe_b):
        pytest.skip("this filesystem has no renameat2 exchange: replacement takes two renames")
    done, seen = threading.Event(), []

    def read() -> None:
        while not done.is_set():
            try:
                seen.append(((target / "a.txt").read_text(), (target / "b.txt").read_text()))
            except FileNotFoundError as err:
                seen.append(("missing", str(err)))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(1, 301):
            with atomic_dir(target) as staging:
                _folder(staging, str(i))
    finally:
        done.set()
        reader.join()
    missing = [s for s in seen if s[0] == "missing"]
    assert not missing, missing[:3]
    assert len(seen) > 300 and any(a != "0" for a, _ in seen)
