"""The options of :class:`lowgrad.LowGrad`: the sections of ``params.yaml`` that decide the method, validated by the
same option models with the same defaults (:mod:`lowgrad.config`, :mod:`lowgrad.options`)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from lowgrad.config import GradientConfig, InputConfig, Int, SubspaceConfig, _Strict, format_validation_error
from lowgrad.errors import ConfigError

DEFAULT_DETECTORS = {  # what LowGrad(model) fits when no ``scoring`` is given
    "forward": {"energy": {}, "knn": {}},
    "gradient": {"knn": {}, "mahalanobis": {}, "residual": {}},
}


class EstimatorModel(_Strict):
    """The classifier: ``arch`` (a ``model.arch`` name) lets :meth:`LowGrad.load` rebuild it from the saved weights;
    without it the caller passes the model to ``load``. ``num_classes``: read from the model's output if not given."""

    arch: str | None = None
    num_classes: Int | None = Field(None, gt=1)


class EstimatorParams(_Strict):
    """The options of :class:`LowGrad`: the method's sections of ``params.yaml`` (their option models and defaults)."""

    seed: Int = 0
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")
    data: InputConfig
    model: EstimatorModel = EstimatorModel()
    gradient: GradientConfig = GradientConfig()
    subspace: SubspaceConfig = SubspaceConfig()
    scoring: Any = Field(DEFAULT_DETECTORS, validate_default=True)  # lowgrad.options.DetectorsConfig

    @field_validator("scoring", mode="before")
    @classmethod
    def _scoring(cls, value: Any) -> Any:
        from lowgrad.options import DetectorsConfig, check_scoring

        return check_scoring(value if isinstance(value, DetectorsConfig) else DetectorsConfig.model_validate(value))

    @model_validator(mode="after")
    def _runnable_route(self) -> "EstimatorParams":
        from lowgrad.route import Route

        try:
            Route.from_params(self)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return self


def parse_options(raw: dict[str, Any], source: str = "LowGrad options") -> EstimatorParams:
    """Validate :class:`LowGrad`'s options (one :class:`ConfigError` line naming the key otherwise)."""
    try:
        return EstimatorParams.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, EstimatorParams)) from None
