"""The route: decided once from params, settings it ignores refused, what each stage does on it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowgrad.config import ConfigError, parse_params, read_raw
from lowgrad.route import Route
from tests.test_pipeline import ROOT, TINY


def _params(**sections):
    raw = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        raw[section] = values
    return parse_params(raw)


@pytest.mark.parametrize("gradient, subspace, name, stores, factors, kernel", [
    ({}, {}, "exact", True, False, "nfk"),
    ({}, {"method": "exact_randomized"}, "matrix_free", False, False, "nfk"),
    ({"sketch": "kronecker"}, {}, "kronecker", True, True, "center"),
    ({"sketch": "dense"}, {}, "dense", True, True, "center"),
    ({"sketch": "kronecker"}, {"kernel": "ntk"}, "kronecker", True, False, "ntk"),
])
def test_route_decides_each_stage(gradient, subspace, name, stores, factors, kernel):
    route = Route.from_params(_params(gradient=gradient, subspace=subspace))
    assert (route.name, route.stores_gradients, route.needs_factors, route.subspace_kernel) == (name, stores, factors, kernel)
    assert route.recomputes_gradients == (name == "matrix_free")


@pytest.mark.parametrize("gradient, subspace, message", [
    ({"sketch_rank": 8}, {}, "gradient.sketch_rank: not used by the exact route"),
    ({"sketch": "kronecker", "sketch_dim": 4096}, {}, "gradient.sketch_dim: not used by the kronecker route"),
    ({"sketch": "dense", "sketch_rank": 8}, {}, "gradient.sketch_rank: not used by the dense route"),
    ({"max_params": 10}, {"method": "exact_randomized"}, "gradient.max_params: not used by the matrix_free route"),
    ({"factor_samples": 64}, {}, "gradient.factor_samples: not used by the exact route"),
    ({}, {"basis": "average_gradient", "k": 8}, "subspace.k: not used by the exact route with the average-gradient basis"),
    ({}, {"method": "incremental", "power_iters": 2}, "subspace.power_iters: not used by the exact route (incremental PCA)"),
    ({"sketch": "kronecker"}, {"method": "exact_randomized"}, "exact_randomized recomputes exact gradients: set gradient.sketch: none"),
])
def test_settings_a_route_ignores_are_refused(gradient, subspace, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _params(gradient=gradient, subspace=subspace)


def test_defaults_are_never_refused_and_raw_helpers_drop_what_a_route_ignores():
    for name, switch in Route.SWITCH.items():  # every route with only the keys that select it
        raw = json.loads(json.dumps(TINY))
        raw["gradient"], raw["subspace"] = {}, {}
        for key, value in switch.items():
            section, leaf = key.split(".")
            raw[section][leaf] = value
        assert Route.from_params(parse_params(raw)).name == name
    raw = read_raw(ROOT / "configs/cifar10_resnet18_cpu.yaml")
    assert Route.of_raw(raw).name == "kronecker" and Route.of_raw(raw).present_ignored(raw) == []
    raw["gradient"]["sketch"] = "dense"
    assert Route.of_raw(raw).present_ignored(raw) == ["gradient.sketch_rank"]


def test_subspace_load_refuses_a_basis_fitted_for_other_rows(tmp_path):
    from lowgrad.errors import StoreError
    from lowgrad.subspace import GradientSubspace

    g = np.random.default_rng(0).standard_normal((40, 12))
    blocks = lambda: iter([(slice(0, 40), g)])  # noqa: E731
    GradientSubspace(kernel="nfk", k=3, oversample=5).fit(blocks, 40, 12).save(tmp_path / "s.npz")
    assert GradientSubspace.load(tmp_path / "s.npz", dim=12, kernel="nfk").components_.shape == (12, 3)
    with pytest.raises(StoreError, match="P 12 \\(expected 30\\)"):
        GradientSubspace.load(tmp_path / "s.npz", dim=30)
    with pytest.raises(StoreError, match="kernel nfk \\(expected center\\)"):
        GradientSubspace.load(tmp_path / "s.npz", kernel="center")
