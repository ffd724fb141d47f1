"""Stage ``factors``: the NFK scale of a sketched route, estimated on a random kernel sample of ``id_train``
(:func:`lowgrad.factors.fit_factors`); a marker file on routes that need none."""

from __future__ import annotations

import numpy as np

from lowgrad.config import Params
from lowgrad.data import load_image_set
from lowgrad.factors import fit_factors
from lowgrad.paths import FACTORS, FACTORS_INFO, PREPARED, atomic_path, write_json
from lowgrad.route import Route


def factors(params: Params) -> None:
    arrays: dict[str, np.ndarray] = {}
    info = {"sketch": params.gradient.sketch}
    if Route.from_params(params).needs_factors:
        from lowgrad.models import load_classifier, pick_device

        model = load_classifier(params).to(pick_device(params.device))
        arrays, info = fit_factors(params, model, load_image_set(PREPARED.format(name="id_train")).images)
    with atomic_path(FACTORS) as tmp:
        np.savez(tmp, **arrays)
    write_json(FACTORS_INFO, info)
