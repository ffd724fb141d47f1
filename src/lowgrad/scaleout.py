"""Scale-out on an existing distributed engine (``dask.distributed``).

- Extraction: the pending chunks split into shards, each filled by one Dask task on a worker, writing
  only its own whole chunks of the zarr store (bit-identical to the single-process run on the CPU, tested; on
  CUDA nothing sets deterministic algorithms, so chunks may differ from a single-process run in the last bits).
- Subspace passes: each worker reduces its shard of chunks to a partial product (moments,
  ``Phi_rows @ R``, ``Phi_rows^T L``) and the client adds the partials (equal to the single-process
  result up to floating-point summation order).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lowgrad.config import Params
from lowgrad.errors import ConfigError, StoreError
from lowgrad.store import ChunkedStore, jsonable
from lowgrad.subspace import RowPasses, combine_partials, partial_pass

log = logging.getLogger(__name__)


@contextlib.contextmanager
def dask_client(params: Params) -> Iterator:
    """A ``distributed.Client`` for ``cluster.scheduler`` (a LocalCluster for ``local``), closed on exit."""
    client, cluster = _client(params)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _shard_pass(path: str, array: str, chunks: list[int], kind: str, arg, shift, scale):
    store = ChunkedStore.open(path)
    blocks = ((store.chunk_slice(i), store.read_chunk(array, i)) for i in chunks)
    return partial_pass(kind, blocks, arg, shift, scale)


class DaskRowPasses(RowPasses):
    """:class:`RowPasses` over a finished store's ``grads``, one Dask task per shard of chunks."""

    def __init__(self, client, store: ChunkedStore, n_shards: int | None = None, shift=None, scale=None) -> None:
        super().__init__(lambda: store.iter_chunks("grads"), store.n_rows, store.columns["grads"][0], shift, scale)
        self.client, self.store = client, store
        n = n_shards or max(1, len(client.scheduler_info()["workers"]))
        self.shards = [list(map(int, c)) for c in np.array_split(np.arange(store.n_chunks), min(n, store.n_chunks))]
        self._scattered: dict[int, object] = {}

    def normalised(self, shift: np.ndarray, scale: np.ndarray) -> "DaskRowPasses":
        out = DaskRowPasses(self.client, self.store, len(self.shards), shift, scale)
        out._scattered = self._scattered
        return out

    def _remote(self, value):
        if value is None:
            return None
        key = id(value)
        if key not in self._scattered:
            self._scattered[key] = (value, self.client.scatter(value, broadcast=True))
        return self._scattered[key][1]

    def run(self, kind: str, arg: np.ndarray | None = None):
        remote = [self._remote(v) for v in (arg, self.shift, self.scale)]
        futures = [
            self.client.submit(_shard_pass, str(self.store.path.resolve()), "grads", shard, kind, *remote, pure=False)
            for shard in self.shards
        ]
        return combine_partials(kind, self.client.gather(futures), self.n_rows)


def _client(params: Params):
    try:
        from distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - depends on the install
        raise ConfigError("cluster.scheduler needs dask.distributed: pip install 'lowgrad[dask]'") from None
    c = params.cluster
    if c.scheduler == "local":
        cluster = LocalCluster(n_workers=c.n_workers, threads_per_worker=c.threads_per_worker, processes=True, dashboard_address=None)
        return Client(cluster), cluster
    return Client(c.scheduler), None


def pin_worker_gpu(params: Params) -> int | None:
    """On a machine with several GPUs, the GPU of this Dask worker: worker ``i`` of a local cluster (named 0, 1,
    ...) takes ``cuda:i mod n`` as its current device, so the workers share the GPUs instead of all landing on
    ``cuda:0``. A worker started with one visible GPU (``CUDA_VISIBLE_DEVICES``, dask-cuda) keeps it. Returns the
    index taken, or None."""
    import torch

    from lowgrad.models import pick_device

    count = torch.cuda.device_count()
    if count < 2 or pick_device(params.device).type != "cuda":
        return None
    from distributed import get_worker

    name = get_worker().name
    index = (int(name) if str(name).isdigit() else sum(map(ord, str(name)))) % count
    torch.cuda.set_device(index)
    log.info("Dask worker %s: cuda:%d of %d GPUs", name, index, count)
    return index


def extract_shard(params: Params, name: str, chunks: list[int], root: str) -> tuple[list[int], int]:
    """Fill some chunks of an existing store (runs on a Dask worker; paths resolved under ``root``).
    Returns the chunks and the worker's process id."""
    import os

    from lowgrad.extract import build_extractor, fill_chunks
    from lowgrad.paths import EXTRACTED

    store = ChunkedStore.open_for_filling(Path(root) / EXTRACTED.format(name=name))
    pin_worker_gpu(params)
    extractor = build_extractor(params, name, root)
    layout = getattr(extractor.gradients, "layout", None)
    if layout is not None and jsonable(layout) != store.meta.get("sketch_layers"):  # e.g. a dense Omega drawn on
        raise StoreError(f"{store.path}: this worker's sketch ({jsonable(layout)}) is not the store's "  # another device
                         f"({store.meta.get('sketch_layers')}): give every worker the coordinator's device")
    fill_chunks(store, extractor, chunks, desc=f"extract {name} shard")
    return list(chunks), os.getpid()


def fill_on_dask(params: Params, name: str, chunks: list[int], root: str | Path) -> dict[str, list[int]]:
    """Fill ``chunks`` of set ``name`` with one Dask task per shard; raises if any shard fails (the chunks
    finished by the other shards stay done, so a rerun resumes). Returns worker pid -> chunks filled."""
    with dask_client(params) as client:
        n_workers = max(1, len(client.scheduler_info()["workers"]))
        n_shards = min(len(chunks), params.cluster.shards or n_workers)
        shards = [list(map(int, s)) for s in np.array_split(np.asarray(chunks), n_shards) if len(s)]
        log.info("extract %s: %d chunks in %d shards on %d Dask workers (%s)", name, len(chunks), len(shards), n_workers, params.cluster.scheduler)
        futures = client.map(extract_shard, [params] * len(shards), [name] * len(shards), shards, [str(Path(root).resolve())] * len(shards), pure=False)
        by_worker: dict[str, list[int]] = {}
        for filled, pid in client.gather(futures):
            by_worker.setdefault(str(pid), []).extend(filled)
        log.info("extract %s: chunks by worker process: %s", name, by_worker)
        return by_worker
