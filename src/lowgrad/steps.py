"""The method's steps after extraction, taken alike by the pipeline's stages (on the stored chunks of the step
before), by :class:`lowgrad.LowGrad` (on arrays in memory or its work directory's stores) and by a fitted detector
scoring new images: the subspace fitted on the kernel set's gradient rows, and each set's rows projected onto it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from lowgrad.route import Route

if TYPE_CHECKING:  # torch costs seconds to import
    from lowgrad.subspace import GradientSubspace


def fit_subspace(params, passes, labels: Callable[[], np.ndarray]) -> "GradientSubspace":
    """The NFK / NTK normaliser and the top-k basis ``V`` of the kernel set's gradient rows ``passes``, as
    ``params.subspace`` and the route say; ``labels()``: the kernel set's labels, read only for the
    average-gradient basis."""
    from lowgrad.subspace import GradientSubspace

    s = params.subspace
    sub = GradientSubspace(kernel=Route.from_params(params).subspace_kernel, basis=s.basis, method=s.method, k=s.k,
                           oversample=s.oversample, power_iters=s.power_iters, seed=params.seed)
    return sub.fit(passes, labels=labels() if s.basis == "average_gradient" else None)


def project_rows(params, sub: "GradientSubspace", passes, exact_sqnorm: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``G_low = phi(g) V`` (float32) and ``||phi||^2`` (float64) of one set's gradient rows ``passes``, in one
    pass; on a route that stores the exact ``||phi||^2`` beside a sketched row (exact-NFK), ``exact_sqnorm()``
    instead of the sketched row's norm, which is only a proxy of it."""
    g_low, sqnorm = sub.transform_blocks_with_sqnorm(passes)
    if Route.from_params(params).stores_exact_sqnorm:
        sqnorm = exact_sqnorm()
    return g_low.astype(np.float32), sqnorm.astype(np.float64)
