"""The NFK scale a sketched route needs before it extracts (the ``factors`` stage's work, and the first step of
:meth:`lowgrad.LowGrad.fit`): per-layer rank-1 Kronecker factors, the dense route's exact ``w``, or the exact-NFK
route's exact ``w`` and centre ``z`` per layer, estimated on a seeded random sample of the kernel set."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from lowgrad.config import Params
from lowgrad.data import to_tensor_batch
from lowgrad.route import Route

log = logging.getLogger(__name__)


def kernel_sample(params: Params, n_rows: int) -> np.ndarray:
    """The rows of the kernel set the factors are estimated on: ``gradient.factor_samples`` of them, seeded, sorted."""
    return np.sort(np.random.default_rng(params.seed).permutation(n_rows)[: params.gradient.factor_samples])


def fit_factors(params: Params, model, images: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, info)`` of this route's factors from ``model`` (a classifier, on the device it should run on) and
    the kernel set's uint8 ``images``; no arrays on a route that needs none."""
    g = params.gradient
    route = Route.from_params(params)
    info: dict[str, Any] = {"sketch": g.sketch}
    if not route.needs_factors:
        return {}, info
    from lowgrad.gradients import count_parameters, select_parameters

    rows = kernel_sample(params, len(images))
    device = next(model.parameters()).device
    param_names = select_parameters(model, g.params)
    batch = route.batch_size(params, count_parameters(model, param_names), device)
    batches = (
        to_tensor_batch(images[rows[i : i + batch]], params.data.mean, params.data.std).to(device)
        for i in range(0, len(rows), batch)
    )
    info.update(kernel="nfk", kernel_samples=len(rows))
    arrays, details = route.fit_factors(params, model, batches, param_names)
    info.update(details)
    log.info("NFK factors of the %s route: %d values from %d samples", route.name, sum(v.size for v in arrays.values()),
             len(rows))
    if "rank_one_relative_error" in details:
        log.info("rank-1 error per layer: %s", {k: round(v, 3) for k, v in details["rank_one_relative_error"].items()})
    return arrays, info


def unflatten(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """``{"layer/part": array}`` (as stored) as ``{layer: {part: array}}`` (as the sketches take them)."""
    factors: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        layer, part = key.rsplit("/", 1)
        factors.setdefault(layer, {})[part] = value
    return factors
