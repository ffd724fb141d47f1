"""Scale-out on an existing distributed engine (``dask.distributed``): extraction chunks split into shards,
each shard filled by one Dask task on a worker, writing only its own whole chunks of the zarr store."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lowgrad.config import Params
from lowgrad.errors import ConfigError

log = logging.getLogger(__name__)


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


def fill_on_dask(params: Params, name: str, chunks: list[int], root: str | Path) -> dict[str, list[int]]:
    """Fill ``chunks`` of set ``name`` with one Dask task per shard; raises if any shard fails (the chunks
    finished by the other shards stay done, so a rerun resumes). Returns worker pid -> chunks filled."""
    from lowgrad.pipeline import extract_shard

    client, cluster = _client(params)
    try:
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
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
