"""Fill a chunked zarr store with logits, penultimate features and per-sample gradients of one image set.

Resumable: rerunning with the same settings continues at the first unfinished chunk.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lowgrad.data import ImageSet, to_tensor_batch
from lowgrad.gradients import PerSampleGradients, check_exact_route
from lowgrad.models import FeatureClassifier
from lowgrad.store import ChunkedStore

log = logging.getLogger(__name__)


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
    """Compute and store ``grads`` (N x P), ``logits`` (N x C), ``features`` (N x F), ``labels`` (N x 1)."""
    model = model.to(device).eval()
    psg = PerSampleGradients(model, param_names)
    check_exact_route(psg.dim, max_params)
    with torch.no_grad():
        logits, feats = model(to_tensor_batch(images.images[:1], mean, std).to(device), return_features=True)
    columns = {
        "grads": (psg.dim, dtype),
        "logits": (logits.shape[1], "float32"),
        "features": (feats.shape[1], "float32"),
        "labels": (1, "int64"),
    }
    meta = {**meta, "param_names": param_names, "n_params": psg.dim}
    store = ChunkedStore.create_or_resume(path, len(images), columns, chunk_rows, meta, on_mismatch=on_mismatch)
    pending = store.pending()
    log.info("extracting %d samples (%d params each) into %s: %d chunks to go", len(images), psg.dim, path, len(pending))
    for index in tqdm(pending, desc=f"extract {Path(path).stem}", unit="chunk"):
        rows = store.chunk_slice(index)
        parts: dict[str, list[np.ndarray]] = {"grads": [], "logits": [], "features": []}
        for start in range(rows.start, rows.stop, batch_size):
            stop = min(start + batch_size, rows.stop)
            x = to_tensor_batch(images.images[start:stop], mean, std).to(device)
            g, lo, f = psg(x)
            parts["grads"].append(g.cpu().numpy().astype(dtype, copy=False))
            parts["logits"].append(lo.cpu().numpy())
            parts["features"].append(f.cpu().numpy())
        chunk = {k: np.concatenate(v) for k, v in parts.items()}
        chunk["labels"] = images.labels[rows, None].astype(np.int64)
        store.write_chunk(index, chunk)
    store.finalize()
    return store
