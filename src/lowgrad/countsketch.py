"""The exact-NFK route's hash: a CountSketch whose buckets come in runs, and the CPU kernel that applies it.

A layer's ``P`` weight coordinates (its formed gradient flattened in ``(C_out, C_in*kh*kw)`` order) are cut into
runs of ``run`` consecutive coordinates; run ``r`` starts at a seeded bucket ``o_r`` and its coordinates go to the next buckets in turn, so
coordinate ``j`` lands in bucket ``(o_{j // run} + j % run) mod dim``, with its own seeded sign. Two coordinates of
one run never share a bucket; two of different runs share one with probability ``1/dim``, as in a CountSketch
(Clarkson & Woodruff 2013), and with independent signs the estimate of an inner product is unbiased with the
same variance formula (a sum over pairs of their collision probability). What runs buy is speed: the signed,
normalised values of a run are added to consecutive buckets, so the hash, the NFK scale and the squared norm
are one vectorised pass over the formed gradient (:func:`hash_rows`, numba on the CPU) instead of three passes and
a scatter (``addcmul``, ``index_add_``, ``vector_norm``), which is what other devices run (:func:`hash_rows_torch`).
On the CPU both add each bucket's values in coordinate order (tested equal); on CUDA ``index_add_`` adds atomically,
in no fixed order, so the sketches agree to float rounding.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

RUN_LENGTH = 256  # coordinates per run (at most the number of buckets); speed is flat from 256 to 4,096


def run_length(dim: int) -> int:
    """Coordinates per run for ``dim`` buckets: a run never wraps onto itself."""
    return min(RUN_LENGTH, dim)


def bucket_index(offsets: torch.Tensor, run: int, size: int, dim: int) -> torch.Tensor:
    """The bucket of each of ``size`` coordinates, ``(o_{j // run} + j % run) mod dim`` (int64, on ``offsets``'s
    device)."""
    j = torch.arange(size, device=offsets.device)
    return (offsets[j // run] + j % run) % dim


def hash_rows_torch(formed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, buckets: torch.Tensor,
                    hashed: torch.Tensor) -> torch.Tensor:
    """Adds ``scale * formed + shift`` (rows ``(n, P)``; overwritten) into ``hashed`` (``(n, dim)``) at ``buckets``;
    returns the rows' squared norms (float64). Any device (``index_add_`` adds atomically on CUDA)."""
    flat = formed.mul_(scale) if shift is None else torch.addcmul(shift, formed, scale, out=formed)
    hashed.index_add_(1, buckets, flat)
    return (flat.double() ** 2).sum(dim=1)


def hash_rows(formed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, offsets: torch.Tensor,
              run: int, hashed: torch.Tensor) -> torch.Tensor:
    """:func:`hash_rows_torch` for CPU tensors in one pass per row: the rows are split over ``torch.get_num_threads()``
    threads (each adds into its own rows of ``hashed``, so no two threads write one bucket). ``formed`` is left as
    it is; ``hashed`` must be contiguous (it is written in place); ``offsets`` holds one start in ``[0, dim)`` per run
    of ``run <= dim`` coordinates."""
    n, size = formed.shape
    dim = hashed.shape[1]
    if not hashed.is_contiguous() or hashed.shape[0] != n:
        raise ValueError(f"hashed must be a contiguous ({n}, dim) tensor, got {tuple(hashed.shape)}")
    if not 0 < run <= dim or offsets.numel() != -(-size // run):
        raise ValueError(f"{offsets.numel()} run starts of {run} coordinates for {size} coordinates and {dim} buckets")
    if offsets.numel() and not (0 <= int(offsets.min()) and int(offsets.max()) < dim):
        raise ValueError(f"run starts outside [0, {dim})")
    formed = formed.contiguous()
    sqnorm = torch.zeros(n, dtype=torch.float64)
    args = [t.detach().numpy() for t in (formed, scale.reshape(-1),
                                         (scale if shift is None else shift).reshape(-1), offsets, hashed, sqnorm)]
    kernel = _kernel()
    parts = [(lo, hi) for lo, hi in _split(n, torch.get_num_threads()) if hi > lo]
    if len(parts) == 1:
        kernel(args[0], args[1], args[2], shift is not None, args[3], run, args[4], args[5])
        return sqnorm
    futures = [_pool().submit(kernel, args[0][lo:hi], args[1], args[2], shift is not None, args[3], run,
                              args[4][lo:hi], args[5][lo:hi]) for lo, hi in parts]
    for f in futures:
        f.result()
    return sqnorm


def warm_up(dtype: torch.dtype) -> None:
    """Loads (or compiles) the CPU kernel for ``dtype`` now, so that the first batch does not pay for it."""
    hash_rows(torch.zeros(1, 2, dtype=dtype), torch.ones(2, dtype=dtype), torch.zeros(2, dtype=dtype),
              torch.zeros(1, dtype=torch.int64), 2, torch.zeros(1, 2, dtype=dtype))


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, n, max(1, parts) + 1).round().astype(int)
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


_POOL_LOCK = threading.Lock()


@functools.cache
def _pool_for(pid: int, workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lowgrad-hash")


def _pool() -> ThreadPoolExecutor:
    """One pool per process (a forked child gets its own: its parent's threads do not survive the fork) and thread
    count."""
    with _POOL_LOCK:
        return _pool_for(os.getpid(), torch.get_num_threads())


def _kernel():
    """The numba kernel (:mod:`lowgrad.countsketch_kernel`), imported on first use: numba compiles it then, or loads
    it from its cache beside that file."""
    from lowgrad.countsketch_kernel import hash_runs

    return hash_runs
