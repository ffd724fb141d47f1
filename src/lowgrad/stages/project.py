"""Stage ``project@<set>``: ``G_low = phi(g) V`` and ``||phi||^2`` of every sample of one set, in one pass over
its gradient rows (stored, or recomputed on the matrix-free route; on the exact-NFK route ``||phi||^2`` is
the exact value stored by ``extract``)."""

from __future__ import annotations

import numpy as np

from lowgrad.config import Params
from lowgrad.paths import PHI_SQNORM, PROJECTED, SUBSPACE, atomic_path
from lowgrad.route import Route
from lowgrad.stages.common import row_passes, stored_sketch_layout
from lowgrad.subspace import GradientSubspace


def project(params: Params, name: str) -> None:
    route = Route.from_params(params)
    with row_passes(params, name) as passes:
        sub = GradientSubspace.load(SUBSPACE, lazy=route.recomputes_gradients, dim=passes.dim,
                                    kernel=route.subspace_kernel, basis=params.subspace.basis)
        if route.is_sketch:
            sub.check_rows_from(stored_sketch_layout(name), f"the rows of {name}")
        g_low, sqnorm = sub.transform_blocks_with_sqnorm(passes)
    if route.stores_exact_sqnorm:  # the sketched row's norm is a proxy: the exact ||phi||^2 was stored beside it
        from lowgrad.paths import EXTRACTED
        from lowgrad.store import ChunkedStore

        sqnorm = ChunkedStore.open(EXTRACTED.format(name=name)).read("phi_sqnorm")[:, 0]
    for template, array in ((PHI_SQNORM, sqnorm.astype(np.float64)), (PROJECTED, g_low.astype(np.float32))):
        with atomic_path(template.format(name=name)) as tmp:
            np.save(tmp, array)
