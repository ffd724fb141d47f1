"""Stage ``subspace``: the NFK / NTK normaliser and the low-dimensional basis ``V``, fitted on the kernel set
(``id_train``) out of core, on the configured route."""

from __future__ import annotations

import logging

from lowgrad.config import Params
from lowgrad.paths import SUBSPACE
from lowgrad.route import Route
from lowgrad.stages.common import row_passes, stored_sketch_layout
from lowgrad.steps import fit_subspace

log = logging.getLogger(__name__)


def subspace(params: Params) -> None:
    route = Route.from_params(params)
    with row_passes(params, "id_train") as passes:
        if route.recomputes_gradients:
            log.info("matrix-free PCA of %d x %d exact gradients: %d passes", passes.n_rows, passes.dim,
                     2 * params.subspace.power_iters + 3)
        sub = fit_subspace(params, passes, _kernel_labels)
    if route.is_sketch:
        sub.sketch_layout_ = stored_sketch_layout("id_train")
    log.info("subspace: %d components explain %.1f %% of the %s kernel's variance",
             sub.components_.shape[1], 100 * sub.explained_variance_ratio_.sum(), sub.kernel)
    sub.save(SUBSPACE)


def _kernel_labels():
    from lowgrad.paths import EXTRACTED
    from lowgrad.store import ChunkedStore

    return ChunkedStore.open(EXTRACTED.format(name="id_train")).read("labels")[:, 0]
