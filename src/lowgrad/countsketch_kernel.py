"""The CPU kernel of :func:`lowgrad.countsketch.hash_rows` (numba): one pass per row adds the signed, normalised
values of each run to its consecutive buckets and sums their squares."""

from __future__ import annotations

import numba
import numpy as np

# reassociation lets the squared norm's float64 sum be vectorised; each bucket still takes its values in coordinate
# order (one per run), so the buckets' sums are those of index_add_
_FAST = {"reassoc", "nsz", "arcp", "contract"}


@numba.njit(nogil=True, boundscheck=False, fastmath=_FAST, inline="always", cache=True)
def _add_run(g, w, s, with_shift, out):
    """``out += g * w (+ s)``, element by element; returns the float64 sum of the added values' squares."""
    acc = 0.0
    if with_shift:
        for r in range(out.shape[0]):
            v = g[r] * w[r] + s[r]
            out[r] = out[r] + v
            acc += np.float64(v) * np.float64(v)
    else:
        for r in range(out.shape[0]):
            v = g[r] * w[r]
            out[r] = out[r] + v
            acc += np.float64(v) * np.float64(v)
    return acc


@numba.njit(nogil=True, boundscheck=False, fastmath=_FAST, cache=True)
def hash_runs(formed, w, s, with_shift, offsets, run, hashed, sqnorm):
    """Rows ``formed`` (n, P), scale ``w`` and shift ``s`` (P,), run starts ``offsets``: adds ``w * formed + s`` into
    ``hashed`` (n, dim) and the rows' squared norms into ``sqnorm`` (n,), run by run (a run's ``w`` and ``s`` stay in
    cache while every row takes it)."""
    n, p = formed.shape
    dim = hashed.shape[1]
    for k in range(offsets.shape[0]):
        j0 = k * run
        m = min(run, p - j0)
        o = offsets[k]
        first = min(m, dim - o)  # the run's buckets up to the last one, then on from bucket 0
        wk, sk = w[j0 : j0 + m], s[j0 : j0 + m]
        for b in range(n):
            g = formed[b, j0 : j0 + m]
            acc = _add_run(g[:first], wk[:first], sk[:first], with_shift, hashed[b, o : o + first])
            if first < m:
                acc += _add_run(g[first:], wk[first:], sk[first:], with_shift, hashed[b, : m - first])
            sqnorm[b] += acc
