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

Stage bodies and benchmarks ask the route (:meth:`Route.from_params`) instead of testing params. One key switches
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

ROUTES = ("exact", "matrix_free", "kronecker", "exact_nfk", "dense")

log = logging.getLogger(__name__)
_warned: set[str] = set()  # each unused setting is stated once per process, however often params are parsed


@dataclass(frozen=True)
class Route:
    name: str  # one of ROUTES
    kernel: str  # nfk | ntk (the configured kernel)
    basis: str  # pca | average_gradient
    method: str  # randomized | incremental | exact_randomized
    unused: tuple[str, ...] = field(default=(), compare=False)  # explicit settings this route does not read

    @classmethod
    def from_params(cls, params: Params) -> "Route":
        """The route of ``params``; raises :class:`ConfigError` on a combination it cannot run, and states (one
        warning each) the explicit settings it does not read."""
        g, s = params.gradient, params.subspace
        unused: list[str] = []
        if s.method == "exact_randomized":
            if s.basis != "pca":
                raise ConfigError("subspace.method exact_randomized computes the PCA basis: set subspace.basis: pca")
            if g.sketch != "none":
                unused.append("gradient.sketch")
            name = "matrix_free"
        else:
            name = "exact" if g.sketch == "none" else g.sketch
        route = cls(name=name, kernel=s.kernel, basis=s.basis, method=s.method)
        unused += [key for key in route.ignored_settings() if key.split(".", 1)[1] in
                   getattr(params, key.split(".", 1)[0]).model_fields_set]
        route = replace(route, unused=tuple(unused))
        for line in route.unused_lines(params):
            if line not in _warned:
                _warned.add(line)
                log.warning(line)
        return route

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
        ignored = []
        if self.name not in ("dense", "exact_nfk"):
            ignored.append("gradient.sketch_dim")
        if self.name != "kronecker":
            ignored.append("gradient.sketch_rank")
        if not self.needs_factors:
            ignored.append("gradient.factor_samples")
        if self.name != "exact":
            ignored.append("gradient.max_params")  # the limit on storing N x P exact gradients
        if not self.stores_gradients:
            ignored.append("gradient.dtype")
        if self.basis == "average_gradient":
            ignored += ["subspace.k", "subspace.method", "subspace.oversample", "subspace.power_iters"]
        elif self.method == "incremental":
            ignored += ["subspace.oversample", "subspace.power_iters"]
        return ignored

    # -- what each stage does on this route --------------------------------------------------------------
    @property
    def sketch(self) -> str | None:
        """The stored sketch: ``kronecker``, ``exact_nfk``, ``dense`` or None (exact gradients or none)."""
        return self.name if self.name in ("kronecker", "exact_nfk", "dense") else None

    @property
    def stores_exact_sqnorm(self) -> bool:
        """Whether ``extract`` stores the exact ``||phi||^2`` of each row (``phi_sqnorm``), which ``project`` then
        reports instead of the sketched row's squared norm."""
        return self.name == "exact_nfk"

    @property
    def stores_gradients(self) -> bool:
        """Whether ``extract`` stores a ``grads`` column (exact rows or a sketch)."""
        return self.name != "matrix_free"

    @property
    def recomputes_gradients(self) -> bool:
        """Whether ``subspace`` and ``project`` recompute exact gradients from the model and the images."""
        return self.name == "matrix_free"

    @property
    def needs_factors(self) -> bool:
        """Whether the ``factors`` stage fits the NFK scale of the sketch (otherwise it writes a marker)."""
        return self.sketch is not None and self.kernel == "nfk"

    @property
    def subspace_kernel(self) -> str:
        """The normalisation the subspace applies to the rows it reads: sketched NFK rows already carry the NFK
        scale, so they are only centred; exact-NFK rows are already centred and scaled (``ntk``: as read)."""
        if self.name == "exact_nfk":
            return "ntk"
        return "center" if self.needs_factors else self.kernel

    @property
    def gradients_label(self) -> str:
        """What the store's ``grads`` column holds (its metadata; checked on reopen)."""
        return {"exact": "exact", "matrix_free": "not stored (matrix-free route)", "kronecker": "kronecker_sketch",
                "exact_nfk": "exact_nfk_countsketch", "dense": "dense_sketch"}[self.name]

    def store_meta(self, params: Params, layout: Any, factors_sha256: str | None) -> dict[str, Any]:
        """The route's part of a store's metadata: what the rows are and, for sketches, what drew them."""
        meta: dict[str, Any] = {"gradients": self.gradients_label}
        if self.sketch is not None:
            meta.update(sketch_seed=params.seed, sketch_layers=layout, factors_sha256=factors_sha256)
        if self.name == "kronecker":
            meta["sketch_rank"] = params.gradient.sketch_rank
        return meta

    # -- raw params mappings (bench helpers that switch routes) ---------------------------------------------
    SWITCH: ClassVar[dict[str, dict[str, str]]] = {  # the params that select each route
        "exact": {"gradient.sketch": "none", "subspace.method": "randomized"},
        "matrix_free": {"gradient.sketch": "none", "subspace.method": "exact_randomized"},
        "kronecker": {"gradient.sketch": "kronecker", "subspace.method": "randomized"},
        "exact_nfk": {"gradient.sketch": "exact_nfk", "subspace.method": "randomized"},
        "dense": {"gradient.sketch": "dense", "subspace.method": "randomized"},
    }

    @classmethod
    def of_raw(cls, raw: dict[str, Any]) -> "Route":
        """The route a raw params mapping asks for (config defaults where a key is absent; not validated)."""
        g, s = raw.get("gradient") or {}, raw.get("subspace") or {}
        method = s.get("method", "randomized")
        name = "matrix_free" if method == "exact_randomized" else {"none": "exact"}.get(g.get("sketch", "none"), g.get("sketch"))
        return cls(name=name, kernel=s.get("kernel", "nfk"), basis=s.get("basis", "pca"), method=method)

    def present_ignored(self, raw: dict[str, Any]) -> list[str]:
        """The keys of a raw params mapping that this route does not read (bench helpers drop them)."""
        return [key for key in self.ignored_settings()
                if key.split(".", 1)[1] in (raw.get(key.split(".", 1)[0]) or {})]
