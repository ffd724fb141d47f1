"""The gradient route of a configuration, decided and validated in one place.

A route is how the normalised per-sample gradients ``phi`` reach the PCA and the projection:

- ``exact``: exact per-sample gradients are stored (``N x P`` per set), the basis is fitted on the store;
- ``matrix_free``: nothing is stored; every pass over a set recomputes its exact gradients on the device
  (``subspace.method: exact_randomized``);
- ``kronecker`` / ``dense``: a sketch of the gradients is stored (``gradient.sketch``); with the NFK kernel the
  sketch already carries the NFK scale (fitted by the ``factors`` stage), so the subspace only centres it;
- ``exact_nfk``: a CountSketch of the exactly normalised gradient ``w * (g - z)`` (``w`` and ``z`` of the
  ``factors`` stage's kernel sample) and its exact ``||phi||^2``, both stored; the subspace takes the rows as
  they are.

Each route is one class of this module's registry (:data:`ROUTES`), like the detectors' one: the settings that
select it, the settings it reads, what ``extract`` stores, the NFK factors it fits and the sketch it extracts with.
Stage bodies and benchmarks ask the route (:meth:`Route.from_params`) instead of testing params; nothing outside
this module compares route names. One key switches
a route: a params file is a superset shared across routes (``dvc exp run -S gradient.sketch=kronecker``), so a
setting the chosen route does not read is stated (one warning line each, listed in the report as
:attr:`Route.unused`), never an error. ``subspace.method: exact_randomized`` selects the matrix-free route whatever
``gradient.sketch`` says (it recomputes exact gradients, so a sketch setting is then one of the unused ones).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from lowgrad.errors import ConfigError

Params = Any  # lowgrad.config.Params, which validates itself through this module (so no import back)

log = logging.getLogger(__name__)
_warned: set[str] = set()  # each unused setting is stated once per process, however often params are parsed

ROUTES: dict[str, type["Route"]] = {}  # name -> class, in declaration order; filled by Route.__init_subclass__
MATRIX_FREE_METHOD = "exact_randomized"  # the subspace.method that selects the matrix-free route
GRADIENT_SETTINGS = ("sketch_dim", "sketch_rank", "factor_samples", "max_params", "dtype")  # read by some routes only


@dataclass(frozen=True)
class Route:
    """One gradient route of a configuration. Subclasses declare the class attributes below and, where the route
    needs them, :meth:`fit_factors`, :meth:`make_sketch` and :meth:`check_model`."""

    kernel: str  # nfk | ntk (the configured kernel)
    basis: str  # pca | average_gradient
    method: str  # randomized | incremental | exact_randomized
    unused: tuple[str, ...] = field(default=(), compare=False)  # explicit settings this route does not read

    name: ClassVar[str]
    sketch_setting: ClassVar[str]  # the gradient.sketch value that selects it ("none": no sketch)
    reads: ClassVar[frozenset[str]]  # which of GRADIENT_SETTINGS it reads
    gradients_label: ClassVar[str]  # what the store's grads column holds (its metadata; checked on reopen)
    stores_gradients: ClassVar[bool] = True  # extract stores a grads column (exact rows or a sketch)
    recomputes_gradients: ClassVar[bool] = False  # subspace and project recompute exact gradients
    stores_exact_sqnorm: ClassVar[bool] = False  # extract stores the exact ||phi||^2 (phi_sqnorm), project reports it
    is_sketch: ClassVar[bool] = False  # the grads column is a sketch drawn from the seed (and the NFK factors)
    bytes_per_value: ClassVar[int] = 0  # bytes per image and selected parameter a batch holds at its peak (B x P
    # matrices of exact gradients; 0: the route never forms them whole): bounds the batch (lowgrad.memory)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            ROUTES[cls.name] = cls

    # -- choosing the route -----------------------------------------------------------------------------------
    @classmethod
    def selected_by(cls, sketch: str, method: str) -> bool:
        """Whether ``gradient.sketch`` / ``subspace.method`` select this route."""
        return method != MATRIX_FREE_METHOD and sketch == cls.sketch_setting

    @classmethod
    def switch(cls) -> dict[str, str]:
        """The params that select this route (bench helpers that switch routes)."""
        return {"gradient.sketch": cls.sketch_setting, "subspace.method": "randomized"}

    @staticmethod
    def named(sketch: str, method: str) -> type["Route"]:
        """The route class ``gradient.sketch`` / ``subspace.method`` select."""
        [chosen] = [cls for cls in ROUTES.values() if cls.selected_by(sketch, method)]
        return chosen

    @classmethod
    def from_params(cls, params: Params) -> "Route":
        """The route of ``params``; raises :class:`ConfigError` on a combination it cannot run, and states (one
        warning each) the explicit settings it does not read."""
        g, s = params.gradient, params.subspace
        chosen = Route.named(g.sketch, s.method)
        route = chosen(kernel=s.kernel, basis=s.basis, method=s.method)
        route.validate()
        route = replace(route, unused=tuple(route.unused_in(params)))
        for line in route.unused_lines(params):
            if line not in _warned:
                _warned.add(line)
                log.warning(line)
        return route

    def validate(self) -> None:
        """Raise :class:`ConfigError` on a setting this route cannot run with."""

    def unused_in(self, params: Params) -> list[str]:
        """The settings ``params`` states explicitly that this route does not read."""
        return [key for key in self.ignored_settings() if key.split(".", 1)[1] in
                getattr(params, key.split(".", 1)[0]).model_fields_set]

    def unused_lines(self, params: Params) -> list[str]:
        """One sentence per unused setting: ``gradient.sketch_rank = 16: not used by the exact route (...)``."""
        lines = []
        for key in self.unused:
            section, leaf = key.split(".", 1)
            value = getattr(getattr(params, section), leaf)
            lines.append(f"{key} = {value!r}: not used by the {self.describe()}")
        return lines

    def describe(self) -> str:
        if self.basis == "average_gradient":
            return f"{self.name} route with the average-gradient basis"
        return f"{self.name} route ({self.method} PCA)"

    def ignored_settings(self) -> list[str]:
        """The ``gradient`` / ``subspace`` keys this route never reads."""
        reads = self.reads | ({"factor_samples"} if self.needs_factors else set())
        ignored = [f"gradient.{key}" for key in GRADIENT_SETTINGS if key not in reads]
        if self.basis == "average_gradient":
            ignored += ["subspace.k", "subspace.method", "subspace.oversample", "subspace.power_iters"]
        elif self.method == "incremental":
            ignored += ["subspace.oversample", "subspace.power_iters"]
        return ignored

    def present_ignored(self, raw: dict[str, Any]) -> list[str]:
        """The keys of a raw params mapping that this route does not read (bench helpers drop them)."""
        return [key for key in self.ignored_settings()
                if key.split(".", 1)[1] in (raw.get(key.split(".", 1)[0]) or {})]

    # -- what each stage does on this route ---------------------------------------------------------------
    @property
    def needs_factors(self) -> bool:
        """Whether the ``factors`` stage fits the NFK scale of the sketch (otherwise it writes a marker)."""
        return self.is_sketch and self.kernel == "nfk"

    @property
    def subspace_kernel(self) -> str:
        """The normalisation the subspace applies to the rows it reads: sketched NFK rows already carry the NFK
        scale, so they are only centred (``ntk``: as read)."""
        return "center" if self.needs_factors else self.kernel

    def store_meta(self, params: Params, layout: Any, factors_sha256: str | None) -> dict[str, Any]:
        """The route's part of a store's metadata: what the rows are and, for sketches, what drew them."""
        meta: dict[str, Any] = {"gradients": self.gradients_label}
        if self.is_sketch:
            meta.update(sketch_seed=params.seed, sketch_layers=layout, factors_sha256=factors_sha256)
        return meta

    def check_model(self, n_params: int, params: Params) -> None:
        """Raise one line if this route cannot take a model with ``n_params`` selected gradient parameters."""

    def batch_size(self, params: Params, n_params: int, device: Any) -> int:
        """The images per batch on ``device``: ``gradient.batch_size``, or fewer where the batch's gradient matrices
        would not fit (:func:`lowgrad.memory.fitting_batch`)."""
        from lowgrad.memory import fitting_batch

        return fitting_batch(params.gradient.batch_size, self.bytes_per_value * n_params, device, f"the {self.name} route")

    def fit_factors(self, params: Params, model: Any, batches: Any, param_names: list[str]) -> tuple[dict, dict]:
        """``(arrays, info)``: the NFK scale this route's sketch needs, from the kernel sample's ``batches``
        (called only when :attr:`needs_factors`)."""
        return {}, {}

    def make_sketch(self, params: Params, model: Any, param_names: list[str], factors: dict) -> Any:
        """The sketch ``extract`` applies to each batch's gradients (``factors``: :meth:`fit_factors`' arrays by
        layer, empty without the NFK kernel), or None where the exact rows are stored or none."""
        return None


def _flat(by_layer: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{layer: {part: array}}`` as stored, ``{"layer/part": array}`` (:func:`lowgrad.factors.unflatten` reverses it)."""
    return {f"{layer}/{part}": v for layer, parts in by_layer.items() for part, v in parts.items()}


class Exact(Route):
    """Exact per-sample gradients stored (``N x P`` per set); the basis is fitted on the store."""

    name = "exact"
    sketch_setting = "none"
    reads = frozenset({"max_params", "dtype"})
    gradients_label = "exact"
    bytes_per_value = 12  # vmap's gradients, their concatenation (float32) and the finiteness check

    def check_model(self, n_params: int, params: Params) -> None:
        from lowgrad.gradients import check_exact_route

        check_exact_route(n_params, params.gradient.max_params)


class MatrixFree(Route):
    """Nothing stored; every pass over a set recomputes its exact gradients on the device."""

    name = "matrix_free"
    sketch_setting = "none"
    reads = frozenset()
    gradients_label = "not stored (matrix-free route)"
    stores_gradients = False
    recomputes_gradients = True
    bytes_per_value = 24  # the exact rows (12, as Exact), normalised (4) and their float64 moments (8)

    @classmethod
    def selected_by(cls, sketch: str, method: str) -> bool:
        return method == MATRIX_FREE_METHOD  # whatever gradient.sketch says (then one of the unused settings)

    @classmethod
    def switch(cls) -> dict[str, str]:
        return {"gradient.sketch": "none", "subspace.method": MATRIX_FREE_METHOD}

    def validate(self) -> None:
        if self.basis != "pca":
            raise ConfigError(f"subspace.method {MATRIX_FREE_METHOD} computes the PCA basis: set subspace.basis: pca")

    def unused_in(self, params: Params) -> list[str]:
        sketch = ["gradient.sketch"] if params.gradient.sketch != "none" else []  # a sketch asked for, not drawn
        return sketch + super().unused_in(params)


class Kronecker(Route):
    """A rank-r Kronecker sketch of each layer's gradient, with the NFK scale as rank-1 Kronecker factors."""

    name = "kronecker"
    sketch_setting = "kronecker"
    reads = frozenset({"sketch_rank", "dtype"})
    gradients_label = "kronecker_sketch"
    is_sketch = True

    def store_meta(self, params: Params, layout: Any, factors_sha256: str | None) -> dict[str, Any]:
        return {**super().store_meta(params, layout, factors_sha256), "sketch_rank": params.gradient.sketch_rank}

    def fit_factors(self, params: Params, model: Any, batches: Any, param_names: list[str]) -> tuple[dict, dict]:
        from lowgrad.nfk_factors import fit_kronecker_nfk

        layer_factors, errors = fit_kronecker_nfk(model, batches, param_names=param_names)
        return _flat(layer_factors), {"rank_one_relative_error": errors}

    def make_sketch(self, params: Params, model: Any, param_names: list[str], factors: dict) -> Any:
        from lowgrad.kronecker import KroneckerSketch

        return KroneckerSketch(model, params.gradient.sketch_rank, params.seed, factors, param_names)


class ExactNFK(Route):
    """A CountSketch of the exactly normalised gradient ``w * (g - z)`` (``w``, ``z`` from the kernel sample) and
    its exact ``||phi||^2``; the subspace takes the rows as they are."""

    name = "exact_nfk"
    sketch_setting = "exact_nfk"
    reads = frozenset({"sketch_dim", "dtype"})
    gradients_label = "exact_nfk_countsketch"
    stores_exact_sqnorm = True
    is_sketch = True

    @property
    def subspace_kernel(self) -> str:
        return "ntk"  # the rows are already centred and scaled

    def fit_factors(self, params: Params, model: Any, batches: Any, param_names: list[str]) -> tuple[dict, dict]:
        from lowgrad.nfk_factors import fit_exact_nfk

        return _flat(fit_exact_nfk(model, batches, param_names=param_names)), {}

    def make_sketch(self, params: Params, model: Any, param_names: list[str], factors: dict) -> Any:
        from lowgrad.exact_nfk import ExactNFKSketch

        return ExactNFKSketch(model, params.gradient.sketch_dim, params.seed, factors or None, param_names)


class Dense(Route):
    """A dense Gaussian sketch of the whole gradient, with the exact NFK scale ``w``."""

    name = "dense"
    sketch_setting = "dense"
    reads = frozenset({"sketch_dim", "dtype"})
    gradients_label = "dense_sketch"
    is_sketch = True
    bytes_per_value = 16  # the exact rows (12, as Exact) and the rows scaled by w (4)

    def fit_factors(self, params: Params, model: Any, batches: Any, param_names: list[str]) -> tuple[dict, dict]:
        from lowgrad.dense_sketch import fit_dense_nfk

        return {"dense/w": fit_dense_nfk(model, param_names, batches)}, {}

    def make_sketch(self, params: Params, model: Any, param_names: list[str], factors: dict) -> Any:
        from lowgrad.dense_sketch import DenseSketch

        return DenseSketch(model, param_names, params.gradient.sketch_dim, params.seed, factors.get("dense", {}).get("w"))


SKETCH_SETTINGS = tuple(dict.fromkeys(cls.sketch_setting for cls in ROUTES.values()))  # gradient.sketch's values
