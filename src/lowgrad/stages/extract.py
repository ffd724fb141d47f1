"""Stage ``extract@<set>``: per-sample gradients (or their sketch), logits and features of one prepared set into a
resumable chunked zarr store, in this process or sharded over a Dask cluster.

What a run finds decides what it computes (the store's settings name the data, model, factors and route it was
written for; another setting starts it afresh):

- an unfinished store (a killed run): the finished chunks that still match their checksums are kept, the rest
  are computed;
- a finished store with damaged or missing chunks (DVC saw the output change): exactly those chunks are recomputed;
- a finished, intact store: DVC runs the stage only when asked to (``dvc repro -f``), when its code changed, or
  when ``dvc.lock`` lost its entry, so it is recomputed from scratch.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lowgrad.config import Params
from lowgrad.extract import build_extractor, fill_chunks, open_store
from lowgrad.paths import EXTRACTED, FACTORS, MODEL, PREPARED, sha256
from lowgrad.route import Route

log = logging.getLogger(__name__)


def extract(params: Params, name: str) -> None:
    route = Route.from_params(params)
    extractor = build_extractor(params, name)
    meta = {
        "dataset": name,
        "dataset_sha256": sha256(PREPARED.format(name=name)),
        "model_sha256": sha256(MODEL),
        "normalize": {"mean": params.data.mean, "std": params.data.std},
        **route.store_meta(params, getattr(extractor.gradients, "layout", None),
                           sha256(FACTORS) if route.is_sketch else None),
    }
    path = EXTRACTED.format(name=name)
    store = open_store(extractor, path, params.gradient.chunk_rows, meta)
    damaged = store.damaged()
    if store.complete and not damaged:
        log.info("%s is finished and intact: recomputing it from scratch (forced run, code change or new lock entry)", path)
        store.restart()
    elif damaged:
        log.warning("%s: chunks %s are damaged or missing (checksums differ): recomputing them", path, damaged)
        store.discard(damaged)
    pending = store.pending()
    log.info("extracting %d samples (%d params each) into %s: %d of %d chunks to go",
             store.n_rows, extractor.n_params, path, len(pending), store.n_chunks)
    if params.cluster.scheduler and pending:
        from lowgrad.scaleout import fill_on_dask

        store.finalize(chunks_by_worker_pid=fill_on_dask(params, name, pending, root=Path.cwd()))
    else:
        fill_chunks(store, extractor, pending, desc=f"extract {name}")
        store.finalize()
