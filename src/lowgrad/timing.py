"""Per-stage wall time and peak memory, recorded as small JSON files and gathered into the metrics.

Each DVC stage process calls :func:`start` when it begins and :func:`record` when its work is done. The score
and report stages, whose outputs gather these files, add their own entry with :func:`snapshot` just before
they write. Peak RSS is the stage process's (``getrusage``; Dask worker processes are not included); peak
GPU memory is torch's allocator peak when CUDA was used.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from lowgrad.paths import TIMINGS, write_text

_started = time.perf_counter()


def start() -> None:
    """Reset the stage clock (and torch's CUDA peak, if torch is already loaded)."""
    global _started
    _started = time.perf_counter()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def snapshot() -> dict[str, Any]:
    """Wall seconds since :func:`start` and peak memory so far."""
    rss_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    out: dict[str, Any] = {"wall_s": round(time.perf_counter() - _started, 2), "peak_rss_mb": round(rss_kb / 1024, 1)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def record(stage: str, root: str | Path = ".") -> Path:
    """Write ``artifacts/timings/<stage>.json`` (``stage`` is DVC's name, e.g. ``extract@id_train``)."""
    path = Path(root) / TIMINGS / f"{stage}.json"
    write_text(path, json.dumps({"stage": stage, **snapshot(), "finished_at": round(time.time(), 2)}) + "\n")
    return path


def collect(root: str | Path = ".") -> dict[str, dict[str, Any]]:
    """Every recorded stage's timing, in the order the stages finished (stages that did not run here are absent)."""
    entries = [json.loads(file.read_text()) for file in (Path(root) / TIMINGS).glob("*.json")]
    entries.sort(key=lambda e: (e.get("finished_at", 0.0), e["stage"]))
    return {e["stage"]: {k: v for k, v in e.items() if k not in ("stage", "finished_at")} for e in entries}
