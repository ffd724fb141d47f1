"""Row-chunked zarr stores that are filled chunk by chunk and survive being killed.

Every array in a store has the same number of rows and the same row chunking, so a "chunk" is one block of
rows across all arrays. A chunk is written whole (chunk-aligned: no partial-chunk rewrites), then a marker
file for it is written and fsync'd; the marker holds the CRC-32 of every array's values in that chunk. A chunk
is trusted only while its values match the marker: ``damaged()`` lists the finished chunks that do not (a
flipped byte, a deleted chunk file, which zarr would read back as zeros), and every read checks the chunks it
returns, so a damaged store is one :class:`StoreError` naming the chunk, never wrong numbers. Reopening with
the same settings resumes at the first unfinished chunk. A store is only readable as a result once
``finalize`` marked it complete, so a killed run never leaves something that looks finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from lowgrad.errors import StoreError
from lowgrad.paths import write_text

log = logging.getLogger(__name__)

_PROGRESS = "_progress"


def jsonable(meta: Any) -> Any:
    """``meta`` as JSON reads it back (tuples as lists, sorted keys): how settings are compared."""
    return json.loads(json.dumps(meta, sort_keys=True))


def _checksum(values: np.ndarray) -> int:
    """CRC-32 of an array's bytes in C order (~4 GB/s: verifying a store costs far less than filling it)."""
    return zlib.crc32(memoryview(np.ascontiguousarray(values)).cast("B"))


def _fsync(file: Path) -> None:
    """Flush a written file to disk (zarr does not write a chunk equal to its fill value: then nothing to flush)."""
    try:
        fd = os.open(file, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _layout_problem(path: Path, layout: dict[str, Any]) -> str | None:
    """What is missing or changed in a store's arrays and progress folder against its recorded layout, or None."""
    if not (path / _PROGRESS).is_dir():
        return "its progress folder is missing"
    try:
        group = zarr.open_group(str(path), mode="r")
        for name, (dim, dtype) in layout["columns"].items():
            array = group[name]
            if (array.shape, array.chunks, str(array.dtype)) != ((layout["n_rows"], dim), (layout["chunk_rows"], dim), dtype):
                return f"array '{name}' is {array.shape} {array.dtype} in chunks {array.chunks}, not as recorded"
    except Exception as err:  # a deleted array folder or an edited array description
        return f"its arrays cannot be opened as recorded ({type(err).__name__}: {err})"
    return None


class ChunkedStore:
    """A zarr group of arrays sharing rows ``0..n_rows`` chunked by ``chunk_rows``."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self.group = group
        layout = group.attrs["layout"]
        self.n_rows: int = layout["n_rows"]
        self.chunk_rows: int = layout["chunk_rows"]
        self.columns: dict[str, list] = layout["columns"]

    # -- creation / reopening -------------------------------------------------------------------------
    @classmethod
    def create_or_resume(
        cls,
        path: str | Path,
        n_rows: int,
        columns: dict[str, tuple[int, str]],
        chunk_rows: int,
        meta: dict[str, Any],
        on_mismatch: str = "error",
    ) -> "ChunkedStore":
        """Open ``path`` for filling. An existing store written with other settings is refused
        (``on_mismatch="error"``) or deleted and started afresh (``"overwrite"``)."""
        path = Path(path)
        layout = {
            "n_rows": int(n_rows),
            "chunk_rows": int(chunk_rows),
            "columns": {k: [int(d), str(t)] for k, (d, t) in columns.items()},
        }
        wanted = jsonable({"layout": layout, "meta": meta})
        if path.exists():
            found = cls._read_settings(path)
            damaged = _layout_problem(path, layout) if found == wanted else None
            if found == wanted and damaged is None:
                store = cls(path, zarr.open_group(str(path), mode="r+"))
                done = store.n_chunks - len(store.pending())
                log.info("resuming %s: %d of %d chunks already done", path, done, store.n_chunks)
                return store
            why = (f"is damaged: {damaged}" if damaged else
                   f"was written with other settings: {cls._difference(found, wanted)}")
            if on_mismatch != "overwrite":
                raise StoreError(f"{path} {why}")
            log.warning("%s %s: starting afresh", path, why)
            shutil.rmtree(path)
        group = zarr.open_group(str(path), mode="w")
        for name, (dim, dtype) in columns.items():
            group.create_array(
                name, shape=(n_rows, dim), chunks=(chunk_rows, dim), dtype=dtype, fill_value=0, compressors=None
            )
        (path / _PROGRESS).mkdir()
        group.attrs.update(wanted)  # last: until its settings are written, a store is not reopened as this one
        return cls(path, group)

    @staticmethod
    def _read_settings(path: Path) -> dict[str, Any] | None:
        try:
            attrs = dict(zarr.open_group(str(path), mode="r").attrs)
        except Exception:  # not a zarr group at all
            return None
        return jsonable({"layout": attrs.get("layout"), "meta": attrs.get("meta")})

    @staticmethod
    def _difference(found: dict[str, Any] | None, wanted: dict[str, Any]) -> str:
        if found is None:
            return "not a lowgrad zarr store"
        diffs = []
        for section in ("layout", "meta"):
            a, b = found.get(section) or {}, wanted[section]
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    diffs.append(f"{section}.{key}: stored {a.get(key)!r}, requested {b.get(key)!r}")
        return "; ".join(diffs) or "unknown difference"

    @classmethod
    def open_for_filling(cls, path: str | Path) -> "ChunkedStore":
        """Reopen a store that ``create_or_resume`` laid out, to write some of its chunks (another process
        may be writing other chunks at the same time: chunks never overlap)."""
        path = Path(path)
        if not (path / _PROGRESS).is_dir():
            raise StoreError(f"{path}: not a store laid out for filling")
        return cls(path, zarr.open_group(str(path), mode="r+"))

    @classmethod
    def open(cls, path: str | Path) -> "ChunkedStore":
        """Open a finished store for reading; an unfinished or foreign one is a :class:`StoreError`."""
        path = Path(path)
        try:
            group = zarr.open_group(str(path), mode="r")
        except Exception:
            raise StoreError(f"{path}: no zarr store here (run the extract stage)") from None
        if "layout" not in group.attrs:
            raise StoreError(f"{path}: not a lowgrad store")
        if not group.attrs.get("complete", False):
            raise StoreError(f"{path}: incomplete store (extraction was interrupted; rerun it to resume)")
        return cls(path, group)

    # -- filling ----------------------------------------------------------------------------------------
    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.group.attrs["meta"])

    def chunk_slice(self, index: int) -> slice:
        return slice(index * self.chunk_rows, min((index + 1) * self.chunk_rows, self.n_rows))

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete", False))

    def _marker(self, index: int) -> Path:
        return self.path / _PROGRESS / str(index)

    def _done(self) -> set[int]:
        return {int(p.name) for p in (self.path / _PROGRESS).iterdir() if p.name.isdigit()}

    def pending(self) -> list[int]:
        """Chunk indices not yet durably written, in order."""
        done = self._done()
        return [i for i in range(self.n_chunks) if i not in done]

    def _recorded(self, index: int) -> dict[str, int]:
        """The checksums a finished chunk's marker records ({} for an unreadable or pre-checksum marker)."""
        try:
            return {k: int(v) for k, v in json.loads(self._marker(index).read_text())["crc32"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def _chunk_file(self, name: str, index: int) -> Path:
        return self.path / name / "c" / str(index) / "0"  # zarr v3's default chunk key for (index, 0)

    def _checked(self, name: str, index: int) -> tuple[np.ndarray | None, str | None]:
        """``(values, None)`` of chunk ``index`` of ``name`` when they match its marker, else ``(None, why)``."""
        rows = self.chunk_slice(index)
        file = self._chunk_file(name, index).relative_to(self.path)
        where = f"chunk {index} (rows {rows.start}-{rows.stop - 1}) of '{name}'"
        try:
            block = self.group[name][rows]
        except Exception as err:  # a truncated, emptied or lengthened chunk file: zarr cannot decode it
            return None, f"{where}: file {file} cannot be read ({type(err).__name__})"
        recorded = self._recorded(index).get(name)
        if recorded is not None and _checksum(block) == recorded:
            return block, None
        why = ("has no checksum record" if recorded is None else
               f"file {file} is missing" if not self._chunk_file(name, index).exists() else
               f"file {file} does not match its checksum")
        return None, f"{where} {why}"

    def damaged(self) -> list[int]:
        """Finished chunks whose stored values do not match their markers or cannot be read (reads the whole
        store once)."""
        return [index for index in sorted(self._done()) if any(self._checked(name, index)[1] for name in self.columns)]

    def discard(self, chunks: Iterable[int]) -> None:
        """Forget that ``chunks`` were written (they become pending) and mark the store incomplete first, so a
        repair that is killed half-way never leaves a store that looks finished."""
        chunks = list(chunks)
        if not chunks:
            return
        self.group.attrs["complete"] = False
        for index in chunks:
            self._marker(index).unlink(missing_ok=True)

    def restart(self) -> None:
        """Forget every chunk: the whole store is recomputed (its layout and settings are kept)."""
        self.discard(range(self.n_chunks))

    def write_chunk(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        """Write one whole row chunk of every array, then mark it done (fsync'd)."""
        rows = self.chunk_slice(index)
        if set(arrays) != set(self.columns):
            raise StoreError(f"write_chunk needs arrays {sorted(self.columns)}, got {sorted(arrays)}")
        checksums = {}
        for name, values in arrays.items():
            expected = (rows.stop - rows.start, self.columns[name][0])
            if values.shape != expected:
                raise StoreError(f"chunk {index} of '{name}': shape {values.shape}, expected {expected}")
            stored = np.asarray(values, dtype=self.columns[name][1])  # the values as the array keeps them
            self.group[name][rows] = stored
            _fsync(self._chunk_file(name, index))  # on disk before the marker that vouches for it
            checksums[name] = _checksum(stored)
        write_text(self._marker(index), json.dumps({"crc32": checksums}) + "\n", durable=True)

    def finalize(self, **extra_attrs: Any) -> None:
        """Mark the store complete (all chunks must be done)."""
        missing = self.pending()
        if missing:
            raise StoreError(f"{self.path}: cannot finalize, chunks {missing[:5]} are not written")
        self.group.attrs.update({**jsonable(extra_attrs), "complete": True})

    # -- reading ----------------------------------------------------------------------------------------
    def read_chunk(self, name: str, index: int) -> np.ndarray:
        """One chunk of one array, checked against its marker: a damaged chunk is a :class:`StoreError` that
        names it and the repair, never its (wrong or zero-filled) values."""
        block, problem = self._checked(name, index)
        if problem:
            dataset = self.meta.get("dataset")
            repair = f"dvc repro -f -s extract@{dataset}" if dataset else "rerun the stage that wrote it"
            raise StoreError(f"{self.path}: {problem}; the store is damaged: repair it with `{repair}` "
                             "(recomputes the damaged chunks only)")
        return block

    def read(self, name: str) -> np.ndarray:
        """A whole array, every chunk checked."""
        return np.concatenate([self.read_chunk(name, i) for i in range(self.n_chunks)])

    def iter_chunks(self, name: str) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(rows, block)`` over whole chunks of one array (the out-of-core access path), each checked."""
        for i in range(self.n_chunks):
            yield self.chunk_slice(i), self.read_chunk(name, i)
