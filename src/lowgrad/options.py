"""Every detector's hyper-parameters: one pydantic model per detector, checked with the config (types and
ranges), before any stage runs. :mod:`lowgrad.detectors` builds the detectors from the validated values; this
module holds no detection code, so validating a params file never loads it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TemperatureOptions(NoOptions):
    temperature: float = Field(1.0, gt=0)


class KNNOptions(NoOptions):
    k: StrictInt = Field(5, ge=1)


class ReActOptions(NoOptions):
    percentile: float = Field(90.0, gt=0, le=100)
    start: StrictInt = Field(0, ge=0)


class BATSOptions(NoOptions):
    lam: float = Field(3.25, gt=0)
    typical: Literal["features", "batchnorm"] = "features"


class ViMOptions(NoOptions):
    dim: StrictInt | None = Field(None, ge=1)


class ODINOptions(NoOptions):
    temperature: float = Field(1000.0, gt=0)
    epsilon: float = Field(0.0014, ge=0)


FORWARD_OPTIONS: dict[str, type[NoOptions]] = {  # "without gradient": on logits / penultimate features
    "msp": NoOptions, "energy": TemperatureOptions, "odin": ODINOptions, "mahalanobis": NoOptions,
    "knn": KNNOptions, "react": ReActOptions, "bats": BATSOptions, "gradnorm": TemperatureOptions, "vim": ViMOptions,
}
GRADIENT_OPTIONS: dict[str, type[NoOptions]] = {  # on G_low (and ||phi||^2)
    "knn": KNNOptions, "mahalanobis": NoOptions, "msp": NoOptions, "energy": TemperatureOptions, "odin": ODINOptions,
    "gradnorm": TemperatureOptions, "react": ReActOptions, "bats": BATSOptions, "residual": NoOptions,
    "gradnorm_phi": NoOptions,
}
# docs/method.md section 5-6 defaults that differ between the two sides
GRADIENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "odin": {"temperature": 100.0, "epsilon": 50.0}, "react": {"start": 10}, "bats": {"lam": 0.1},
}


def detector_options(name: str, kwargs: dict[str, Any] | None, gradient: bool) -> dict[str, Any]:
    """Validated hyper-parameters of one configured detector (gradient-side defaults from docs/method.md where they
    differ); raises ``ValueError`` naming the option, e.g. ``knn.k: Input should be a valid integer``."""
    registry = GRADIENT_OPTIONS if gradient else FORWARD_OPTIONS
    if name not in registry:
        raise ValueError(f"{name}: unknown detector '{name}' (known: {sorted(registry)})")
    options = registry[name]
    try:
        return options.model_validate({**(GRADIENT_DEFAULTS.get(name, {}) if gradient else {}), **(kwargs or {})}).model_dump()
    except ValidationError as err:
        problems = []
        for item in err.errors():
            key = ".".join(str(p) for p in item["loc"])
            msg = f"unknown option (allowed: {sorted(options.model_fields)})" if item["type"] == "extra_forbidden" else item["msg"]
            problems.append(f"{name}.{key}: {msg}" if key else f"{name}: {msg}")
        raise ValueError("; ".join(problems)) from None


def check_detector_config(config: dict[str, dict[str, Any]], where: str) -> None:
    """Unknown detector names, unknown hyper-parameters and values of the wrong type or range are errors."""
    for name, kwargs in config.items():
        try:
            detector_options(name, kwargs, where.endswith("gradient"))
        except ValueError as err:
            raise ValueError(f"{where}.{err}") from None
