"""Row-chunked zarr stores that are filled chunk by chunk and survive being killed.

Every array in a store has the same number of rows and the same row chunking, so a "chunk" is one block of
rows across all arrays. A chunk is written whole (chunk-aligned: no partial-chunk rewrites), then a marker
file for it is written and fsync'd. Reopening with the same settings resumes at the first unfinished chunk;
finished chunks are never recomputed. A store is only readable as a result once ``finalize`` marked it
complete, so a killed run never leaves something that looks finished.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from lowgrad.errors import StoreError
from lowgrad.paths import write_text

log = logging.getLogger(__name__)

_PROGRESS = "_progress"


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(meta, sort_keys=True))


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
        wanted = _jsonable({"layout": layout, "meta": meta})
        if path.exists():
            found = cls._read_settings(path)
            if found == wanted:
                store = cls(path, zarr.open_group(str(path), mode="r+"))
                done = store.n_chunks - len(store.pending())
                log.info("resuming %s: %d of %d chunks already done", path, done, store.n_chunks)
                return store
            if on_mismatch != "overwrite":
                raise StoreError(f"{path} was written with other settings: {cls._difference(found, wanted)}")
            log.warning("%s holds another configuration (%s): starting afresh", path, cls._difference(found, wanted))
            shutil.rmtree(path)
        group = zarr.open_group(str(path), mode="w")
        for name, (dim, dtype) in columns.items():
            group.create_array(
                name, shape=(n_rows, dim), chunks=(chunk_rows, dim), dtype=dtype, fill_value=0, compressors=None
            )
        group.attrs.update(wanted)
        (path / _PROGRESS).mkdir()
        return cls(path, group)

    @staticmethod
    def _read_settings(path: Path) -> dict[str, Any] | None:
        try:
            attrs = dict(zarr.open_group(str(path), mode="r").attrs)
        except Exception:  # not a zarr group at all
            return None
        return _jsonable({"layout": attrs.get("layout"), "meta": attrs.get("meta")})

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

    def pending(self) -> list[int]:
        """Chunk indices not yet durably written, in order."""
        done = {int(p.name) for p in (self.path / _PROGRESS).iterdir() if p.name.isdigit()}
        return [i for i in range(self.n_chunks) if i not in done]

    def write_chunk(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        """Write one whole row chunk of every array, then mark it done (fsync'd)."""
        rows = self.chunk_slice(index)
        if set(arrays) != set(self.columns):
            raise StoreError(f"write_chunk needs arrays {sorted(self.columns)}, got {sorted(arrays)}")
        for name, values in arrays.items():
            expected = (rows.stop - rows.start, self.columns[name][0])
            if values.shape != expected:
                raise StoreError(f"chunk {index} of '{name}': shape {values.shape}, expected {expected}")
            self.group[name][rows] = values
        write_text(self.path / _PROGRESS / str(index), "done\n", durable=True)

    def finalize(self, **extra_attrs: Any) -> None:
        """Mark the store complete (all chunks must be done)."""
        missing = self.pending()
        if missing:
            raise StoreError(f"{self.path}: cannot finalize, chunks {missing[:5]} are not written")
        self.group.attrs.update({**_jsonable(extra_attrs), "complete": True})

    # -- reading ----------------------------------------------------------------------------------------
    def array(self, name: str) -> zarr.Array:
        return self.group[name]

    def read(self, name: str) -> np.ndarray:
        return self.group[name][:]

    def iter_chunks(self, name: str) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(rows, block)`` over whole chunks of one array (the out-of-core access path)."""
        arr = self.group[name]
        for i in range(self.n_chunks):
            rows = self.chunk_slice(i)
            yield rows, arr[rows]
