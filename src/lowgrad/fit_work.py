"""Where :meth:`lowgrad.LowGrad.fit` keeps what it extracts: each set's columns (gradient rows, logits, features,
labels) and the route's NFK factors.

Without a work directory they are held in memory (:class:`ArrayColumns`). With one (``fit(..., work_dir=...)``) the
folder takes a project's layout (:mod:`lowgrad.paths`: ``artifacts/sketch/factors.npz``,
``artifacts/extract/<set>.zarr``) and each set streams into a :class:`lowgrad.store.ChunkedStore` chunk by chunk,
as the ``extract`` stage writes it, so only one chunk of gradient rows is ever in memory and every later pass
(the PCA, the projection) re-reads the store. What is stored names what it was computed from: the images' and
labels' digest, the model (:func:`model_sha256`: weights, structure and outputs), the normalisation, the route's
settings and factors, and the extraction code. So a killed fit resumes at the first unfinished chunk; a later fit
of the same images and model on the same route reuses the stores and factors (fitting other detectors or another
subspace extracts nothing); a store or factors file computed from anything else is replaced; every chunk is
checked against its checksum before it is used; and one fit at a time holds the folder (``fit.lock``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lowgrad.errors import ConfigError
from lowgrad.paths import DVC_YAML, EXTRACTED, FACTORS, FACTORS_INFO, FIT_LOCK, atomic_path, sha256, write_json
from lowgrad.store import jsonable

log = logging.getLogger(__name__)

# the library code that decides what the factors and the stores hold (the factors and extract stages' code in
# dvc.yaml, tests/test_fit_work.py checks, and this module): a store or factors file of other code is recomputed
EXTRACTION_CODE = ("config", "errors", "paths", "route", "timing", "data", "gradients", "memory", "checkpoints",
                   "models", "networks", "factors", "layer_capture", "kronecker", "exact_nfk", "nfk_factors",
                   "countsketch", "countsketch_kernel", "dense_sketch", "subspace", "store", "moments_kernel",
                   "extract", "transfer", "fit_work")


def model_sha256(model, image_size: int, channels: int) -> str:
    """sha256 of what the classifier computes: its weights (as :func:`lowgrad.checkpoints.save_state_dict` writes
    them), its class and structure, and its logits and features on a fixed seeded batch, computed on a CPU copy (two
    models with the same weights but another forward pass differ)."""
    import copy

    import torch

    from lowgrad.checkpoints import weights_sha256

    h = hashlib.sha256(weights_sha256(model).encode())
    h.update(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}".encode())
    cpu = copy.deepcopy(model).cpu().eval()
    x = torch.rand(2, channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, features = cpu(x, return_features=True)
    for out in (logits, features):
        h.update(memoryview(np.ascontiguousarray(out.numpy())).cast("B"))
    return h.hexdigest()


def digest_arrays(*arrays: np.ndarray) -> str:
    """sha256 of arrays' dtypes, shapes and bytes (C order)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


class ArrayColumns:
    """One set's extracted columns held in memory, read as a :class:`lowgrad.store.ChunkedStore` is read
    (``columns``, ``n_rows``, ``read``, ``iter_chunks`` over blocks of ``chunk_rows`` rows)."""

    def __init__(self, arrays: dict[str, np.ndarray], chunk_rows: int, name: str) -> None:
        self.arrays, self.chunk_rows, self.path = arrays, chunk_rows, f"{name} (in memory)"
        self.n_rows = len(arrays["labels"])
        self.columns = {k: [v.shape[1], str(v.dtype)] for k, v in arrays.items()}

    def read(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def iter_chunks(self, name: str) -> Iterator[tuple[slice, np.ndarray]]:
        from lowgrad.subspace import row_blocks

        return row_blocks(self.arrays[name], self.chunk_rows)


class FitWork:
    """The work of one :meth:`lowgrad.LowGrad.fit`: ``folder`` None holds every set in memory, a folder streams
    them through its stores (module docstring)."""

    def __init__(self, folder: str | Path | None, params, model) -> None:
        from lowgrad.route import Route

        if folder is not None and (not isinstance(folder, (str, os.PathLike)) or not str(folder)):
            raise ConfigError(f"work_dir must name a folder (a str or Path), got {folder!r}")
        self.folder = None if folder is None else Path(folder).expanduser()
        self.params, self.model, self.route = params, model, Route.from_params(params)
        self._lock: int | None = None

    def __enter__(self) -> "FitWork":
        """Take the work directory (one fit at a time: a second one refused in one line) and name its inputs."""
        from lowgrad.saved_detector import code_digests

        if self.folder is None:
            return self
        if (self.folder / DVC_YAML).exists():
            raise ConfigError(f"work_dir {self.folder} is a lowgrad project (its stores are DVC's): give fit a "
                              "folder of its own")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / FIT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # a file there, a read-only folder, no space
            raise ConfigError(f"work_dir {self.folder} cannot be used as a folder for the fit's files "
                              f"({err.strerror or type(err).__name__}): name a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"work_dir {self.folder} is in use by another fit (lock {self.folder / FIT_LOCK}): "
                              "wait for it, or give this fit a folder of its own") from None
        self._lock = fd
        data = self.params.data
        try:
            self._inputs = {"model_sha256": model_sha256(self.model, data.image_size, data.channels),
                            "code_sha256": code_digests(EXTRACTION_CODE),
                            "normalize": {"mean": data.mean, "std": data.std}}
        except BaseException:
            self.__exit__()  # __exit__ runs only after a successful __enter__: release the folder here
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)  # the kernel releases it too when the process dies
            os.close(self._lock)
            self._lock = None

    # -- factors ---------------------------------------------------------------------------------------------------

    def factors(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The route's NFK factors (flat, as the ``factors`` stage stores them) fitted on the kernel set's images, or
        those of the work directory when they were fitted from the same inputs and their file is intact."""
        from lowgrad.factors import fit_factors

        if self.folder is None or not self.route.needs_factors:
            return fit_factors(self.params, self.model, images)[0]
        wanted = jsonable({**self._inputs, "images_sha256": digest_arrays(images), "seed": self.params.seed,
                           "route": self.route.name, "kernel": self.route.kernel,
                           "gradient": self.params.gradient.model_dump(mode="json", exclude={"chunk_rows"})})
        path, info = self.folder / FACTORS, self.folder / FACTORS_INFO
        found = _read_json(info)
        if found.get("inputs") == wanted and path.is_file() and sha256(path) == found.get("sha256"):
            log.info("%s: reusing the NFK factors fitted from the same inputs", path)
            with np.load(path) as z:
                return {key: z[key] for key in z.files}
        if found:
            recorded = found.get("inputs") or {}
            differ = sorted(k for k in set(wanted) | set(recorded) if wanted.get(k) != recorded.get(k))
            log.warning("%s: %s: fitting them again", path,
                        f"fitted from other {', '.join(differ)}" if differ else "its file does not match its record")
        arrays, details = fit_factors(self.params, self.model, images)
        info.unlink(missing_ok=True)  # the record goes first: a half-replaced pair never looks valid
        with atomic_path(path) as tmp:
            np.savez(tmp, **arrays)
        write_json(info, {"inputs": wanted, "sha256": sha256(path), "details": jsonable(details)})
        return arrays

    # -- extraction ------------------------------------------------------------------------------------------------

    def extract(self, extractor, name: str, factors: dict[str, np.ndarray]):
        """Set ``name``'s columns through ``extractor`` (its images and labels): in memory, or in the work
        directory's store, resumed or reused when it was written from the same inputs."""
        from tqdm import tqdm

        chunk_rows, n = self.params.gradient.chunk_rows, len(extractor.images)
        if self.folder is None:
            starts = tqdm(range(0, n, chunk_rows), desc=f"extract {name}", unit="chunk", disable=n <= chunk_rows)
            parts = [extractor.compute(slice(s, min(s + chunk_rows, n))) for s in starts]
            return ArrayColumns({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, chunk_rows, name)
        from lowgrad.extract import fill_chunks, open_store

        names = sorted(factors)
        factors_sha256 = digest_arrays(np.array(names), *(factors[k] for k in names)) if self.route.is_sketch else None
        meta = {**self._inputs, "dataset": name,
                "dataset_sha256": digest_arrays(extractor.images.images, extractor.images.labels),
                "batch_size": extractor.batch_size, "device": str(extractor.device),  # both move the float rounding
                **self.route.store_meta(self.params, getattr(extractor.gradients, "layout", None), factors_sha256)}
        store = open_store(extractor, self.folder / EXTRACTED.format(name=name), chunk_rows, meta)
        damaged = store.damaged()
        if damaged:
            log.warning("%s: chunks %s are damaged or missing (checksums differ): recomputing them", store.path, damaged)
            store.discard(damaged)
        pending = store.pending()
        if pending or not store.complete:
            log.info("extracting %s into %s: %d of %d chunks to go", name, store.path, len(pending), store.n_chunks)
            fill_chunks(store, extractor, pending, desc=f"extract {name}")
            store.finalize()
        else:
            log.info("%s: reusing the rows extracted from the same inputs", store.path)
        return store


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
