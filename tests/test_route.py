"""The route: decided once from params, settings it does not read stated (never refused), what each stage does on it."""

from __future__ import annotations

import ast
import json

import numpy as np
import pytest

from lowgrad.config import ConfigError, parse_params, raw_route, read_raw
from lowgrad.route import ROUTES, SKETCH_SETTINGS, Route
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
    ({"sketch": "exact_nfk"}, {}, "exact_nfk", True, True, "ntk"),  # rows already exact NFK rows: taken as read
    ({"sketch": "kronecker"}, {"kernel": "ntk"}, "kronecker", True, False, "ntk"),
])
def test_route_decides_each_stage(gradient, subspace, name, stores, factors, kernel):
    route = Route.from_params(_params(gradient=gradient, subspace=subspace))
    assert (route.name, route.stores_gradients, route.needs_factors, route.subspace_kernel) == (name, stores, factors, kernel)
    assert route.recomputes_gradients == (name == "matrix_free")


@pytest.mark.parametrize("gradient, subspace, name, message", [
    ({"sketch_rank": 8}, {}, "exact", "gradient.sketch_rank = 8: not used by the exact route"),
    ({"sketch": "kronecker", "sketch_dim": 4096}, {}, "kronecker", "gradient.sketch_dim = 4096: not used by the kronecker route"),
    ({"sketch": "dense", "sketch_rank": 8}, {}, "dense", "gradient.sketch_rank = 8: not used by the dense route"),
    ({"max_params": 10}, {"method": "exact_randomized"}, "matrix_free", "gradient.max_params = 10: not used by the matrix_free route"),
    ({"factor_samples": 64}, {}, "exact", "gradient.factor_samples = 64: not used by the exact route"),
    ({}, {"basis": "average_gradient", "k": 8}, "exact", "subspace.k = 8: not used by the exact route with the average-gradient basis"),
    ({}, {"method": "incremental", "power_iters": 2}, "exact", "subspace.power_iters = 2: not used by the exact route (incremental PCA)"),
    ({"sketch": "kronecker"}, {"method": "exact_randomized"}, "matrix_free", "gradient.sketch = 'kronecker': not used by the matrix_free route"),
])
def test_settings_a_route_does_not_read_are_stated_once_never_refused(gradient, subspace, name, message, caplog):
    import lowgrad.route

    lowgrad.route._warned.clear()
    with caplog.at_level("WARNING", logger="lowgrad.route"):
        params = _params(gradient=gradient, subspace=subspace)
        route = Route.from_params(params)  # parsed twice: stated once
    assert route.name == name
    stated = [r.getMessage() for r in caplog.records if r.name == "lowgrad.route"]
    assert len(stated) == 1 and stated[0].startswith(message), stated
    assert route.unused_lines(params) == stated


def test_a_real_contradiction_is_still_an_error():
    with pytest.raises(ConfigError, match="exact_randomized computes the PCA basis: set subspace.basis: pca"):
        _params(gradient={}, subspace={"method": "exact_randomized", "basis": "average_gradient"})


def test_defaults_are_never_refused_and_raw_helpers_drop_what_a_route_ignores():
    for name, cls in ROUTES.items():  # every route with only the keys that select it
        switch = cls.switch()
        raw = json.loads(json.dumps(TINY))
        raw["gradient"], raw["subspace"] = {}, {}
        for key, value in switch.items():
            section, leaf = key.split(".")
            raw[section][leaf] = value
        assert Route.from_params(parse_params(raw)).name == name
    raw = read_raw(ROOT / "configs/cifar10_resnet18_cpu.yaml")
    assert raw_route(raw).name == "exact_nfk" and raw_route(raw).present_ignored(raw) == ["gradient.sketch_rank"]
    raw["gradient"]["sketch"] = "kronecker"  # one key back to the Kronecker route, which reads the rank, not the buckets
    assert raw_route(raw).present_ignored(raw) == ["gradient.sketch_dim"]


def test_subspace_load_refuses_a_basis_fitted_for_other_rows(tmp_path):
    from lowgrad.errors import StoreError
    from lowgrad.subspace import GradientSubspace
    from tests.test_subspace import subspace

    g = np.random.default_rng(0).standard_normal((40, 12))
    blocks = lambda: iter([(slice(0, 40), g)])  # noqa: E731
    subspace(kernel="nfk", k=3, oversample=5).fit(blocks, 40, 12).save(tmp_path / "s.npz")
    assert GradientSubspace.load(tmp_path / "s.npz", dim=12, kernel="nfk").components_.shape == (12, 3)
    with pytest.raises(StoreError, match="P 12 \\(expected 30\\)"):
        GradientSubspace.load(tmp_path / "s.npz", dim=30)
    with pytest.raises(StoreError, match="kernel nfk \\(expected center\\)"):
        GradientSubspace.load(tmp_path / "s.npz", kernel="center")


PROFILES = ["params.yaml", "configs/cifar10_resnet18_cpu.yaml", "configs/cifar10_resnet18_gpu.yaml",
            "configs/imagenet_resnet50.yaml"]
SWITCHES = [({"gradient.sketch": "none"}, "exact"), ({"gradient.sketch": "kronecker"}, "kronecker"),
            ({"gradient.sketch": "dense"}, "dense"), ({"gradient.sketch": "exact_nfk"}, "exact_nfk"),
            ({"subspace.method": "exact_randomized"}, "matrix_free")]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("switch, name", SWITCHES, ids=[r for _, r in SWITCHES])
def test_one_key_switches_the_route_of_every_profile(profile, switch, name):
    """`dvc exp run -S gradient.sketch=<route>` (or `--set subspace.method=exact_randomized`) from the default and
    every profile validates and plans every stage; nothing heavy runs. The ImageNet protocol's average-gradient
    basis is not a PCA, so the matrix-free PCA is a real contradiction there (one error naming the fix)."""
    from lowgrad.config import load_params
    from lowgrad.plan import stage_plan

    if profile.startswith("configs/imagenet") and name == "matrix_free":
        with pytest.raises(ConfigError, match="set subspace.basis: pca"):
            load_params(ROOT / profile, switch)
        return
    params = load_params(ROOT / profile, switch)
    assert Route.from_params(params).name == name
    plan = stage_plan(params, ROOT)
    assert {"train", "model", "factors", "subspace", "score", "report"} <= set(plan)
    assert {f"extract@{s}" for s in ["id_train", "id_test", *params.data.ood_names]} <= set(plan)


def test_the_documented_gpu_command_validates():
    """docs/routes.md: the gpu profile switched to the matrix-free exact route with four --set's."""
    from lowgrad.config import load_params

    text = (ROOT / "docs/routes.md").read_text()
    assert "--set gradient.sketch=none --set subspace.method=exact_randomized" in text
    params = load_params(ROOT / "configs/cifar10_resnet18_gpu.yaml", {
        "gradient.sketch": "none", "subspace.method": "exact_randomized", "subspace.power_iters": 1,
        "subspace.oversample": 50, "gradient.batch_size": 128})
    route = Route.from_params(params)
    assert route.name == "matrix_free"
    assert set(route.unused) == {"gradient.sketch_rank", "gradient.factor_samples", "gradient.dtype"}


SOURCES = ("src", "stages", "flows", "bench")  # where a route could be decided; tests and docs may name routes


def route_name_dispatch(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines of ``tree`` that decide by a route's name: a comparison with one (``route.sketch == "dense"``,
    ``x in ("kronecker", ...)``) or a mapping keyed by two or more of them (``{"exact": ..., "dense": ...}[name]``; one key is a label, as
    a bench's ``{"exact": reference, "sketch": rows}``)."""
    def named(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(named(e) for e in node.elts)

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(named(n) for n in [node.left, *node.comparators]):
            lines.append(node.lineno)
        elif isinstance(node, ast.Dict) and sum(k is not None and named(k) for k in node.keys) >= 2:
            lines.append(node.lineno)
    return lines


def test_only_the_registry_decides_by_route_name():
    """Adding a route touches lowgrad/route.py only: no other module compares a route's name (or the gradient.sketch
    value that selects it) or keys a mapping by them."""
    names = (set(ROUTES) | set(SKETCH_SETTINGS)) - {"none"}
    found = {}
    for base in SOURCES:
        for path in sorted((ROOT / base).rglob("*.py")):
            if path == ROOT / "src/lowgrad/route.py":
                continue
            lines = route_name_dispatch(ast.parse(path.read_text()), names)
            if lines:
                found[str(path.relative_to(ROOT))] = lines
    assert found == {}, found
    # negative controls: the dispatch this replaced is caught, and the registry itself would be
    before = 'if route.sketch == "kronecker":\n    a = 1\nelif route.sketch in ("exact_nfk", "dense"):\n    a = 2\n' \
             'label = {"exact": "exact", "dense": "dense_sketch"}[name]\n'
    assert route_name_dispatch(ast.parse(before), names) == [1, 3, 5]


def test_every_route_declares_what_it_is_and_reads_only_known_settings():
    from lowgrad.route import GRADIENT_SETTINGS

    for name, cls in ROUTES.items():
        route = cls(kernel="nfk", basis="pca", method=cls.switch()["subspace.method"])
        assert route.name == name and Route.named(*cls.switch().values()) is cls
        assert route.reads <= set(GRADIENT_SETTINGS), name
        assert (cls.make_sketch is not Route.make_sketch) == (cls.fit_factors is not Route.fit_factors) == cls.is_sketch
        assert route.needs_factors == route.is_sketch
        assert not cls(kernel="ntk", basis="pca", method="randomized").needs_factors  # NTK: no scale to fit
