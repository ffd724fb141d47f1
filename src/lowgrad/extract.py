"""Fill a chunked zarr store with logits, penultimate features and per-sample gradients of one image set.

Resumable: rerunning with the same settings continues at the first unfinished chunk. Chunks are
independent units of work, so they can also be filled by several processes at once (see
:mod:`lowgrad.scaleout`): each writes whole chunks of its own, never a chunk of another.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lowgrad.config import Params
from lowgrad.data import ImageSet, load_image_set, to_tensor_batch
from lowgrad.factors import unflatten
from lowgrad.gradients import PerSampleGradients, check_exact_route, count_parameters, select_parameters
from lowgrad.checkpoints import load_checkpoint
from lowgrad.models import fresh_model, pick_device
from lowgrad.networks import FeatureClassifier
from lowgrad.paths import FACTORS, MODEL, PREPARED
from lowgrad.route import Route
from lowgrad.store import ChunkedStore
from lowgrad.transfer import to_device, to_host

log = logging.getLogger(__name__)


class Extractor:
    """Computes the stored columns for any block of rows of one image set."""

    def __init__(
        self,
        model: FeatureClassifier,
        param_names: list[str],
        images: ImageSet | None,
        mean: list[float],
        std: list[float],
        *,
        batch_size: int,
        dtype: str,
        max_params: int,
        device: torch.device,
        sketch=None,
        store_gradients: bool = True,
    ) -> None:
        """``images``: the set whose rows :meth:`compute` reads (None: only :meth:`compute_images`, a saved
        detector's); ``sketch``: a Kronecker or dense sketch to store instead of exact gradients;
        ``store_gradients=False`` (the matrix-free route, which recomputes gradients): logits, features and labels
        only."""
        self.model = model.to(device).eval()
        self.param_names, self.images = param_names, images
        self.mean, self.std = mean, std
        self.batch_size, self.dtype, self.device = batch_size, dtype, device
        self.n_params = count_parameters(self.model, param_names)
        self.gradients = None
        if sketch is not None:
            self.gradients = sketch
        elif store_gradients:
            self.gradients = PerSampleGradients(self.model, param_names)
            check_exact_route(self.gradients.dim, max_params)

    def columns(self) -> dict[str, tuple[int, str]]:
        with torch.no_grad():
            x = to_tensor_batch(self.images.images[:1], self.mean, self.std).to(self.device)
            logits, feats = self.model(x, return_features=True)
        grads = {} if self.gradients is None else {"grads": (self.gradients.dim, self.dtype)}
        if getattr(self.gradients, "exact_sqnorm", False):
            grads["phi_sqnorm"] = (1, "float64")  # the exact ||phi||^2 of each sketched row
        return {
            **grads,
            "logits": (logits.shape[1], "float32"),
            "features": (feats.shape[1], "float32"),
            "labels": (1, "int64"),
        }

    def compute(self, rows: slice) -> dict[str, np.ndarray]:
        """The stored columns of rows ``rows`` of this extractor's image set."""
        out = self.compute_images(self.images.images[rows])
        out["labels"] = self.images.labels[rows, None].astype(np.int64)
        return out

    def compute_images(self, images: np.ndarray, gradients: bool = True) -> dict[str, np.ndarray]:
        """Logits, features and (unless ``gradients`` is False) the route's gradient rows of uint8 ``images``, in
        batches of ``batch_size`` (new images scored by a saved detector come here, its set's rows through
        :meth:`compute`)."""
        source = self.gradients if gradients else None
        parts: dict[str, list[np.ndarray]] = {"logits": [], "features": []}
        for start in range(0, len(images), self.batch_size):
            x = to_device(to_tensor_batch(images[start : start + self.batch_size], self.mean, self.std), self.device)
            if source is None:
                with torch.no_grad():
                    lo, f = self.model(x, return_features=True)
                lo, f = to_host([lo, f])
            else:
                g, lo, f, *sqnorm = source(x)
                g = g.to(getattr(torch, self.dtype))  # cast where computed: a float16 store copies half the bytes
                g, lo, f, *sqnorm = to_host([g, lo, f, *sqnorm])  # one wait for the stream per batch
                parts.setdefault("grads", []).append(g)
                if sqnorm:
                    parts.setdefault("phi_sqnorm", []).append(sqnorm[0][:, None])
            parts["logits"].append(lo)
            parts["features"].append(f)
        return {k: np.concatenate(v) for k, v in parts.items()}


def load_factors(path: str | Path = FACTORS) -> dict[str, dict[str, np.ndarray]]:
    """The ``factors`` stage's arrays as ``{layer: {part: array}}``."""
    with np.load(path) as z:
        return unflatten({key: z[key] for key in z.files})


def build_extractor(params: Params, name: str, root: str | Path = ".") -> Extractor:
    """The extractor of one prepared set on this configuration's route (``root``: the project directory)."""
    root = Path(root)
    model = load_checkpoint(fresh_model(params), root / MODEL).eval()
    factors = load_factors(root / FACTORS) if Route.from_params(params).needs_factors else {}
    return make_extractor(params, model, load_image_set(root / PREPARED.format(name=name)), factors)


def make_extractor(params: Params, model: FeatureClassifier, images: ImageSet | None,
                   factors: dict[str, dict[str, np.ndarray]]) -> Extractor:
    """The extractor of ``images`` (None: of whatever images it is given, :meth:`Extractor.compute_images`) through
    ``model`` on this configuration's route (``factors``: the route's NFK scale, :func:`lowgrad.factors.fit_factors`
    unflattened; empty on routes without)."""
    route = Route.from_params(params)
    g = params.gradient
    param_names = select_parameters(model, g.params)
    device = pick_device(params.device)
    sketch = route.make_sketch(params, model.to(device), param_names, factors)
    batch_size = route.batch_size(params, count_parameters(model, param_names), device)
    return Extractor(
        model, param_names, images, params.data.mean, params.data.std,
        batch_size=batch_size, dtype=g.dtype, max_params=g.max_params, device=device, sketch=sketch,
        store_gradients=route.stores_gradients,
    )


def open_store(
    extractor: Extractor, path: str | Path, chunk_rows: int, meta: dict[str, Any], on_mismatch: str = "overwrite"
) -> ChunkedStore:
    meta = {**meta, "param_names": extractor.param_names, "n_params": extractor.n_params}
    return ChunkedStore.create_or_resume(
        path, len(extractor.images), extractor.columns(), chunk_rows, meta, on_mismatch=on_mismatch
    )


def fill_chunks(store: ChunkedStore, extractor: Extractor, chunks: Iterable[int], desc: str = "extract") -> None:
    """Compute and durably write the given chunks (each one whole)."""
    for index in tqdm(list(chunks), desc=desc, unit="chunk"):
        store.write_chunk(index, extractor.compute(store.chunk_slice(index)))


def extract_to_store(
    model: FeatureClassifier,
    param_names: list[str],
    images: ImageSet,
    path: str | Path,
    mean: list[float],
    std: list[float],
    *,
    batch_size: int,
    chunk_rows: int,
    dtype: str,
    max_params: int,
    device: torch.device,
    meta: dict[str, Any],
    on_mismatch: str = "overwrite",
) -> ChunkedStore:
    """Compute and store ``grads`` (N x P), ``logits`` (N x C), ``features`` (N x F), ``labels`` (N x 1)
    in this process, resuming where a previous run stopped."""
    extractor = Extractor(
        model, param_names, images, mean, std, batch_size=batch_size, dtype=dtype, max_params=max_params, device=device
    )
    store = open_store(extractor, path, chunk_rows, meta, on_mismatch)
    store.discard(store.damaged())
    pending = store.pending()
    log.info("extracting %d samples (%d params each) into %s: %d chunks to go", len(images), extractor.n_params, path, len(pending))
    fill_chunks(store, extractor, pending, desc=f"extract {Path(path).stem}")
    store.finalize()
    return store
