"""Stage ``project@<set>``: ``G_low = phi(g) V`` and ``||phi||^2`` of every sample of one set, in one pass over
its gradient rows (stored, or recomputed on the matrix-free route; on the exact-NFK route ``||phi||^2`` is
the exact value stored by ``extract``)."""

from __future__ import annotations

import numpy as np

from lowgrad.config import Params
from lowgrad.paths import PHI_SQNORM, PROJECTED, SUBSPACE, atomic_path
from lowgrad.route import Route
from lowgrad.stages.common import row_passes, stored_sketch_layout
from lowgrad.steps import project_rows
from lowgrad.subspace import GradientSubspace


def project(params: Params, name: str) -> None:
    route = Route.from_params(params)
    with row_passes(params, name) as passes:
        sub = GradientSubspace.load(SUBSPACE, lazy=route.recomputes_gradients, dim=passes.dim,
                                    kernel=route.subspace_kernel, basis=params.subspace.basis)
        if route.is_sketch:
            sub.check_rows_from(stored_sketch_layout(name), f"the rows of {name}")
        g_low, sqnorm = project_rows(params, sub, passes, lambda: _stored_exact_sqnorm(name))
    for template, array in ((PHI_SQNORM, sqnorm), (PROJECTED, g_low)):
        with atomic_path(template.format(name=name)) as tmp:
            np.save(tmp, array)


def _stored_exact_sqnorm(name: str) -> np.ndarray:
    from lowgrad.paths import EXTRACTED
    from lowgrad.store import ChunkedStore

    return ChunkedStore.open(EXTRACTED.format(name=name)).read("phi_sqnorm")[:, 0]
