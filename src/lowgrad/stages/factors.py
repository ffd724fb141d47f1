"""Stage ``factors``: the NFK scale of a sketched route, estimated on a random kernel sample of ``id_train``
(per-layer rank-1 Kronecker factors, the dense route's exact ``w``, or the exact-NFK route's exact ``w`` and
centre ``z`` per layer); a marker file on routes that need none."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from lowgrad.config import Params
from lowgrad.data import load_image_set, to_tensor_batch
from lowgrad.paths import FACTORS, FACTORS_INFO, PREPARED, atomic_path, write_json
from lowgrad.route import Route

log = logging.getLogger(__name__)


def factors(params: Params) -> None:
    g = params.gradient
    route = Route.from_params(params)
    info: dict[str, Any] = {"sketch": g.sketch}
    arrays: dict[str, np.ndarray] = {}
    if route.needs_factors:
        from lowgrad.gradients import select_parameters
        from lowgrad.models import load_classifier, pick_device

        train = load_image_set(PREPARED.format(name="id_train"))
        rows = np.sort(np.random.default_rng(params.seed).permutation(len(train))[: g.factor_samples])
        device = pick_device(params.device)
        model = load_classifier(params).to(device)
        batches = (
            to_tensor_batch(train.images[rows[i : i + g.batch_size]], params.data.mean, params.data.std).to(device)
            for i in range(0, len(rows), g.batch_size)
        )
        param_names = select_parameters(model, g.params)
        info.update(kernel="nfk", kernel_samples=len(rows))
        if route.sketch == "dense":
            from lowgrad.dense_sketch import fit_dense_nfk

            arrays = {"dense/w": fit_dense_nfk(model, param_names, batches)}
            log.info("exact NFK scale of %d parameters from %d samples", arrays["dense/w"].size, len(rows))
        elif route.sketch == "exact_nfk":
            from lowgrad.sketch import fit_exact_nfk

            exact = fit_exact_nfk(model, batches, param_names=param_names)
            arrays = {f"{layer}/{part}": v for layer, parts in exact.items() for part, v in parts.items()}
            log.info("exact NFK scale and centre of %d parameters from %d samples",
                     sum(v.size for k, v in arrays.items() if k.endswith("_w")), len(rows))
        else:
            from lowgrad.sketch import fit_kronecker_nfk

            layer_factors, errors = fit_kronecker_nfk(model, batches, param_names=param_names)
            arrays = {f"{layer}/{part}": v for layer, parts in layer_factors.items() for part, v in parts.items()}
            info.update(rank_one_relative_error=errors)
            log.info("NFK Kronecker factors from %d samples; rank-1 error per layer: %s", len(rows),
                     {k: round(v, 3) for k, v in errors.items()})
    with atomic_path(FACTORS) as tmp:
        np.savez(tmp, **arrays)
    write_json(FACTORS_INFO, info)
