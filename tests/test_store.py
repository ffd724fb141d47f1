"""Chunked zarr store: chunk-aligned writes, durable progress, resume after SIGKILL, refusal of foreign stores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from lowgrad.errors import StoreError
from lowgrad.store import ChunkedStore

COLUMNS = {"a": (5, "float32"), "b": (2, "int64")}


def _fill(store: ChunkedStore, chunks=None) -> None:
    for i in chunks if chunks is not None else store.pending():
        rows = store.chunk_slice(i)
        n = rows.stop - rows.start
        store.write_chunk(i, {"a": np.full((n, 5), i, np.float32), "b": np.arange(rows.start, rows.stop)[:, None].repeat(2, 1)})


def test_writes_are_whole_chunks(tmp_path, monkeypatch):
    store = ChunkedStore.create_or_resume(tmp_path / "s.zarr", 23, COLUMNS, 8, {"seed": 1})
    writes = []
    original = zarr.Array.__setitem__

    def spy(self, key, value):
        writes.append((self.chunks[0], self.shape[0], key))
        return original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", spy)
    _fill(store)
    for chunk_rows, n_rows, key in writes:
        assert key.start % chunk_rows == 0
        assert key.stop == min(key.start + chunk_rows, n_rows), "every write covers one whole chunk"
    with pytest.raises(StoreError, match="shape"):
        store.write_chunk(0, {"a": np.zeros((3, 5), np.float32), "b": np.zeros((3, 2), np.int64)})


def test_resume_and_completion(tmp_path):
    path = tmp_path / "s.zarr"
    store = ChunkedStore.create_or_resume(path, 23, COLUMNS, 8, {"seed": 1})
    _fill(store, [0, 2])
    with pytest.raises(StoreError, match="cannot finalize"):
        store.finalize()
    with pytest.raises(StoreError, match="incomplete"):
        ChunkedStore.open(path)
    again = ChunkedStore.create_or_resume(path, 23, COLUMNS, 8, {"seed": 1})
    assert again.pending() == [1]
    _fill(again)
    again.finalize()
    done = ChunkedStore.open(path)
    np.testing.assert_array_equal(done.read("a")[:, 0], np.repeat([0, 1, 2], [8, 8, 7]))


def test_a_store_killed_while_being_laid_out_is_laid_out_again(tmp_path, monkeypatch):
    """Killed after its arrays but before its settings were written, a store is not reopened as the one asked for
    (it has no settings) but laid out afresh, and fills; its progress folder exists before its settings do."""
    path = tmp_path / "s.zarr"
    seen = []

    def killed(self, *args, **kwargs):
        seen.append((path / "_progress").is_dir())
        raise KeyboardInterrupt

    monkeypatch.setattr(zarr.core.attributes.Attributes, "update", killed)
    with pytest.raises(KeyboardInterrupt):
        ChunkedStore.create_or_resume(path, 23, COLUMNS, 8, {"seed": 1})
    monkeypatch.undo()
    assert seen == [True]
    store = ChunkedStore.create_or_resume(path, 23, COLUMNS, 8, {"seed": 1}, on_mismatch="overwrite")
    assert store.pending() == [0, 1, 2]
    _fill(store)
    store.finalize()
    assert ChunkedStore.open(path).complete


def test_foreign_settings_are_refused_or_overwritten(tmp_path):
    path = tmp_path / "s.zarr"
    _fill(ChunkedStore.create_or_resume(path, 23, COLUMNS, 8, {"seed": 1, "layers": ["conv1"]}))
    with pytest.raises(StoreError, match=r"meta.seed: stored 1, requested 2"):
        ChunkedStore.create_or_resume(path, 23, COLUMNS, 8, {"seed": 2, "layers": ["conv1"]})
    with pytest.raises(StoreError, match=r"meta.layers"):
        ChunkedStore.create_or_resume(path, 23, COLUMNS, 8, {"seed": 1, "layers": ["conv2"]})
    fresh = ChunkedStore.create_or_resume(path, 23, COLUMNS, 8, {"seed": 2}, on_mismatch="overwrite")
    assert fresh.pending() == [0, 1, 2]
    (tmp_path / "junk").mkdir()
    with pytest.raises(StoreError, match="not a lowgrad"):
        ChunkedStore.create_or_resume(tmp_path / "junk", 23, COLUMNS, 8, {})


def _finished(path: Path) -> ChunkedStore:
    store = ChunkedStore.create_or_resume(path, 23, COLUMNS, 8, {"seed": 1, "dataset": "toy"})
    _fill(store)
    store.finalize()
    return ChunkedStore.open(path)


def _flip_byte(file: Path, offset: int = 7) -> None:
    """Flip one byte in place, keeping the file's modification time (what DVC cannot see)."""
    stat = file.stat()
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("damage", ["flip", "delete", "truncate", "empty", "lengthen"])
def test_damaged_chunk_is_named_on_read_and_repaired_exactly(tmp_path, damage):
    path = tmp_path / "s.zarr"
    store = _finished(path)
    intact = {name: store.read(name) for name in COLUMNS}
    assert store.damaged() == []  # negative control: an untouched store verifies
    chunk_file = path / "a" / "c" / "1" / "0"
    content = chunk_file.read_bytes()
    if damage == "flip":
        _flip_byte(chunk_file)
    elif damage == "delete":
        chunk_file.unlink()
    else:  # what a power cut can leave of a chunk (zarr cannot decode any of these)
        chunk_file.write_bytes({"truncate": content[:10], "empty": b"", "lengthen": content + bytes(8)}[damage])
    damaged = ChunkedStore.open(path)
    assert damaged.damaged() == [1]
    why = {"flip": " file a/c/1/0 does not match its checksum", "delete": " file a/c/1/0 is missing"}.get(
        damage, r": file a/c/1/0 cannot be read \(ValueError\)")
    with pytest.raises(StoreError, match=rf"chunk 1 \(rows 8-15\) of 'a'{why}.*dvc repro -f -s extract@toy"):
        damaged.read("a")
    with pytest.raises(StoreError, match="chunk 1"):
        list(damaged.iter_chunks("a"))
    np.testing.assert_array_equal(damaged.read("b"), intact["b"])  # the other array's chunk 1 is fine
    others = lambda: {f: f.stat().st_mtime_ns for f in path.glob("*/c/*/0") if f.parent.name != "1"}  # noqa: E731
    untouched = others()
    repair = ChunkedStore.create_or_resume(path, 23, COLUMNS, 8, {"seed": 1, "dataset": "toy"})
    repair.discard(repair.damaged())
    assert not ChunkedStore.open_for_filling(path).complete, "a repair in progress never looks finished"
    assert repair.pending() == [1]
    _fill(repair)
    repair.finalize()
    assert others() == untouched, "only chunk 1 was rewritten"
    for name in COLUMNS:
        np.testing.assert_array_equal(ChunkedStore.open(path).read(name), intact[name])


@pytest.mark.parametrize("damage", ["progress folder", "array folder", "array description"])
def test_a_store_missing_its_layout_is_replaced_or_refused(tmp_path, damage):
    """Settings that match over a store whose progress folder, an array or an array's description is gone: it is not
    resumed (every later run would fail on it) but laid out afresh, or refused naming the damage."""
    import shutil

    path = tmp_path / "s.zarr"
    _finished(path)
    {"progress folder": lambda: shutil.rmtree(path / "_progress"), "array folder": lambda: shutil.rmtree(path / "a"),
     "array description": lambda: (path / "a" / "zarr.json").write_text("{}")}[damage]()
    with pytest.raises(StoreError, match="is damaged: ") as err:
        ChunkedStore.create_or_resume(path, 23, COLUMNS, 8, {"seed": 1, "dataset": "toy"})
    assert "\n" not in str(err.value)
    store = ChunkedStore.create_or_resume(path, 23, COLUMNS, 8, {"seed": 1, "dataset": "toy"}, on_mismatch="overwrite")
    assert store.pending() == [0, 1, 2]
    _fill(store)
    store.finalize()
    assert ChunkedStore.open(path).damaged() == []


def test_marker_without_checksum_is_not_trusted(tmp_path):
    path = tmp_path / "s.zarr"
    _finished(path)
    (path / "_progress" / "2").write_text("done\n")  # the pre-checksum marker format
    store = ChunkedStore.open(path)
    assert store.damaged() == [2]
    with pytest.raises(StoreError, match="chunk 2 .* has no checksum record"):
        store.read("b")


def test_stored_dtype_is_what_is_checked(tmp_path):
    """float64 values written into a float16 column are checked as the float16 values the store keeps."""
    store = ChunkedStore.create_or_resume(tmp_path / "h.zarr", 10, {"g": (3, "float16")}, 4, {})
    rng = np.random.default_rng(0)
    for i in store.pending():
        rows = store.chunk_slice(i)
        store.write_chunk(i, {"g": rng.normal(size=(rows.stop - rows.start, 3))})
    store.finalize()
    assert store.damaged() == [] and ChunkedStore.open(tmp_path / "h.zarr").read("g").dtype == np.float16


_CHILD = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from lowgrad.data import ImageSet
    from lowgrad.extract import extract_to_store
    from lowgrad.gradients import select_parameters
    from lowgrad.models import build_model
    torch.manual_seed(0)
    model = build_model("small_cnn", 6, 1).eval()
    rng = np.random.default_rng(0)
    images = ImageSet(rng.integers(0, 256, (N, 8, 8, 1), dtype=np.uint8), rng.integers(0, 6, N))
    extract_to_store(model, select_parameters(model, "all"), images, sys.argv[1], [0.5], [0.5],
                     batch_size=16, chunk_rows=32, dtype="float32", max_params=10**6,
                     device=torch.device("cpu"), meta={"test": 1})
    """
)


def _run_inline(path: Path, n: int) -> None:
    exec(compile(_CHILD.replace("N", str(n)).replace("sys.argv[1]", repr(str(path))), "child", "exec"), {})


def test_sigkilled_extraction_resumes_to_identical_result(tmp_path):
    n = 3000
    killed = tmp_path / "killed.zarr"
    script = tmp_path / "child.py"
    script.write_text(_CHILD.replace("N", str(n)))
    proc = subprocess.Popen([sys.executable, str(script), str(killed)], stderr=subprocess.DEVNULL)
    progress = killed / "_progress"
    deadline = time.time() + 120
    while time.time() < deadline:
        if progress.is_dir() and sum(p.name.isdigit() for p in progress.iterdir()) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(StoreError, match="incomplete"):
        ChunkedStore.open(killed)
    done_before = sorted(int(p.name) for p in progress.iterdir() if p.name.isdigit())
    assert 3 <= len(done_before) < n // 32 + 1, "the kill must land mid-run"
    chunk_files = {i: killed / "grads" / "c" / str(i) / "0" for i in done_before}
    mtimes = {i: f.stat().st_mtime_ns for i, f in chunk_files.items()}

    _run_inline(killed, n)  # resume
    assert {i: f.stat().st_mtime_ns for i, f in chunk_files.items()} == mtimes, "finished chunks were rewritten"
    reference = tmp_path / "reference.zarr"
    _run_inline(reference, n)
    a, b = ChunkedStore.open(killed), ChunkedStore.open(reference)
    for name in ("grads", "logits", "features", "labels"):
        np.testing.assert_array_equal(a.read(name), b.read(name))
