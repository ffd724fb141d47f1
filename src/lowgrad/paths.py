"""The artifact layout (paths relative to the project root) and the one way files are written: atomically.

    data/prepared/<set>.npz               prepare    uint8 images + labels
    models/trained.pt                     train      the trained state_dict (a marker when a checkpoint is given)
    models/trained.resume.pt              train      the last finished epoch's state while training (not tracked)
    models/model.pt, model.json           model      float32 state_dict (imported checkpoint) + metadata
    artifacts/sketch/factors.npz, .json   factors    NFK Kronecker / dense scale factors (a marker otherwise)
    artifacts/extract/<set>.zarr          extract    grads / logits / features / labels (chunked zarr)
    artifacts/subspace/subspace.npz       subspace   kernel normaliser + spectrum
    artifacts/subspace/subspace.zarr      subspace   basis V (P x k, chunked)
    artifacts/projected/<set>.npy         project    G_low (N x k)
    artifacts/projected/<set>.sqnorm.npy  project    ||phi||^2 per sample (the whole normalised gradient)
    artifacts/scores.npz                  score      every detector's scores per set
    artifacts/detector/                   score      the saved detector (arrays.npz + detector.json)
    report/metrics.json                   score      metrics (DVC metrics)
    report/report.md, report/plots/       report     Markdown report and PNG plots
    artifacts/timings/<stage>.json        every stage: wall seconds and peak memory

Every file and folder is written beside its path and renamed into place once complete (:func:`atomic_path`,
:func:`atomic_dir`). ``score`` and ``report`` keep their outputs in place while they rerun (``persist`` in dvc.yaml)
and replace them only at the end, so an interrupted or failed rerun leaves the previous run's detector, scores,
metrics and report whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PARAMS = "params.yaml"  # the params file DVC reads (flows.pipeline writes it from a profile)
DVC_YAML = "dvc.yaml"
DVC_LOCK = "dvc.lock"
PREPARED = "data/prepared/{name}.npz"
TRAINED = "models/trained.pt"  # model.checkpoint that means: train model.arch on id_train (stage train)
TRAIN_RESUME = "models/trained.resume.pt"  # the train stage's resumable state; removed once models/trained.pt is saved
MODEL = "models/model.pt"
MODEL_INFO = "models/model.json"
FACTORS = "artifacts/sketch/factors.npz"
FACTORS_INFO = "artifacts/sketch/factors.json"
EXTRACTED = "artifacts/extract/{name}.zarr"
SUBSPACE = "artifacts/subspace/subspace.npz"
COMPONENTS = "artifacts/subspace/subspace.zarr"  # the basis V beside SUBSPACE
PROJECTED = "artifacts/projected/{name}.npy"
PHI_SQNORM = "artifacts/projected/{name}.sqnorm.npy"  # set names hold no '.', so never another set's G_low
SCORES = "artifacts/scores.npz"
DETECTOR = "artifacts/detector"  # the saved detector (lowgrad.saved_detector): its arrays and what they are
DETECTOR_ARRAYS = f"{DETECTOR}/arrays.npz"
DETECTOR_META = f"{DETECTOR}/detector.json"
METRICS = "report/metrics.json"
REPORT = "report/report.md"
PLOTS = "report/plots"
TIMINGS = "artifacts/timings"
ABLATIONS = "report/ablations"  # bench.ablations' table
FIT_LOCK = "fit.lock"  # LowGrad.fit's work directory: held while a fit uses it (lowgrad.fit_work)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so NumPy and torch keep the name); once the block
    succeeds it replaces ``path`` in one rename, and on failure it is removed: a reader never sees a
    half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; once the block succeeds it takes ``path``'s place, and on
    failure (an error, Ctrl-C) it is removed. The previous folder stays whole until the new one is complete, and a
    reader finds one or the other: the two are exchanged in one step where the OS can (Linux's ``renameat2``),
    else by two renames a few microseconds apart. Staging folders of killed runs are removed here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.new-*"):
        if not _alive(stale.name.rpartition("-")[2]):
            shutil.rmtree(stale, ignore_errors=True)
    staging = path.with_name(f".{path.name}.new-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if not path.exists():
            staging.rename(path)
        elif not _exchange(staging, path):  # staging now holds the previous folder, removed below
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS or filesystem has no
    such call."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_text(path: str | Path, text: str, durable: bool = False) -> None:
    """Write ``text`` atomically; ``durable``: also flushed to disk (file and directory entry) before returning,
    for markers that must survive a power cut, like a store's finished-chunk records."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
    if durable:
        dir_fd = os.open(Path(path).parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def sha256(path: str | Path) -> str:
    """Hex digest of a file, or of a directory's sorted (relative path, file digest) pairs."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(file.relative_to(path)).encode())
            h.update(sha256(file).encode())
        return h.hexdigest()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
