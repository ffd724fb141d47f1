"""The CPU kernel of :func:`lowgrad.subspace.add_block_moments` for tensors (numba): one pass over a float32 or
float64 block sums each column's deviations from a shift, and their squares, in float64."""

from __future__ import annotations

import numba
import numpy as np

TILE = 2048  # columns summed over every row at a time, in local sums that stay in cache (1,024-4,096: as fast)


@numba.njit(nogil=True, boundscheck=False, cache=True)
def shifted_sums(block, shift, s1, s2):
    """Adds ``sum_r (block[r, j] - shift[j])`` to ``s1[j]`` and ``sum_r (block[r, j] - shift[j])^2`` to ``s2[j]``
    (``block`` (n, P) C-contiguous; ``shift``, ``s1``, ``s2`` float64 (P,)). Each column's rows are added in row
    order."""
    n, p = block.shape
    t1, t2 = np.empty(TILE), np.empty(TILE)
    for lo in range(0, p, TILE):
        m = min(TILE, p - lo)
        centre = shift[lo : lo + m]
        t1[:m] = 0.0
        t2[:m] = 0.0
        for r in range(n):
            row = block[r, lo : lo + m]
            for j in range(m):
                d = np.float64(row[j]) - centre[j]
                t1[j] += d
                t2[j] += d * d
        for j in range(m):
            s1[lo + j] += t1[j]
            s2[lo + j] += t2[j]
