"""The ``scoring`` section's schema: the detectors on each side (validated through the registry of
:mod:`lowgrad.detectors`, where each detector declares its options), the fusion groups, the probe and the bootstrap
(:func:`lowgrad.config.scored_params_schema` adds it to the params). The flow validates the whole file before any
stage runs; of the stages only ``score`` and ``report`` load this module (and so the detectors' registry), so editing
a detector or its options, or adding one, reruns those two and nothing upstream."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from lowgrad.detectors import detector_options
from lowgrad.rows import Row, check_group_name, configured, member_detector

Int = StrictInt  # counts: `true` and "40" are refused, as everywhere in the params


class _Strict(BaseModel):
    """The scoring section's models: unknown keys are errors, values are frozen (as :mod:`lowgrad.config`'s)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_detector_config(config: dict[str, dict[str, Any]], where: str) -> None:
    """Unknown detector names, unknown hyper-parameters and values of the wrong type or range are errors."""
    for name, kwargs in config.items():
        try:
            detector_options(name, kwargs, where.endswith("gradient"))
        except ValueError as err:
            raise ValueError(f"{where}.{err}") from None


class FusionGroup(_Strict):
    """Detectors fused with equal weights. Members name forward detectors as in ``scoring.forward`` and
    gradient ones with the ``grad_`` prefix (``[vim, knn, grad_residual]``)."""

    name: str
    members: list[str] = Field(min_length=2)
    rule: Literal["zscore", "fisher"] = "zscore"

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return check_group_name(value)

    @field_validator("members")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"fusion group members must be distinct, got {value}")
        return value


class FusionConfig(_Strict):
    """Groups of detectors, each member fitted on the rest of ``id_train`` and calibrated on a held-out random
    part of it. A group with gradient members is also scored without them (``fused_<name>_forward_only``)."""

    calibration_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    groups: list[FusionGroup] = []


class BootstrapConfig(_Strict):
    """Paired bootstrap of every metric: ID test and each OOD set resampled with replacement, independently."""

    replicates: Int = Field(1000, ge=100)
    seed: Int = 0
    level: float = Field(0.95, gt=0.5, lt=1.0)


class PrimaryComparison(_Strict):
    """The one comparison declared before the run: a row that uses the gradient against a forward-only row. The
    report's headline reads it at the nominal level; every other reading is secondary (docs/method.md, section 8)."""

    row: str = Field(description="a row that uses the gradient: grad_<detector> or fused_<group>")
    baseline: str = Field(description="a forward-only row: a forward detector, fused_<group>_forward_only, or a "
                          "group without gradient members")


class ProbeConfig(_Strict):
    """The linear probe (BatchNorm1d -> Linear) for probe-based gradient detectors (docs/method.md section 5)."""

    epochs: Int = Field(10, gt=0)
    batch_size: Int = Field(16, gt=1)
    lr: float = Field(0.1, gt=0)


class DetectorsConfig(_Strict):
    """Detector name -> its hyper-parameters (an empty mapping takes the defaults)."""

    forward: dict[str, dict[str, Any]]
    gradient: dict[str, dict[str, Any]]
    probe: ProbeConfig = ProbeConfig()
    fusion: FusionConfig = FusionConfig()
    bootstrap: BootstrapConfig = BootstrapConfig()
    min_ood_samples: Int = Field(
        50, ge=1, description="OOD sets with fewer images are reported on their own and left out of the mean over "
        "sets and of the verdicts (a resample of a tiny set is nearly the set itself, so its interval says little)"
    )
    primary: PrimaryComparison | None = None
    k_sweep: list[Annotated[Int, Field(gt=0)]] = Field(
        [], description="PCA basis: rescore the gradient detectors on the first k' components of G_low "
        "(values >= subspace.k are skipped, so `-S subspace.k=...` experiments need no second change)"
    )

    @model_validator(mode="after")
    def _groups_refer_to_configured_detectors(self) -> "DetectorsConfig":
        names = [g.name for g in self.fusion.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"scoring.fusion.groups: names must be distinct, got {names}")
        for group in self.fusion.groups:
            for member in group.members:
                name, gradient = member_detector(member)
                side = "gradient" if gradient else "forward"
                if name not in (self.gradient if gradient else self.forward):
                    raise ValueError(f"fusion group '{group.name}': member '{member}' is not in scoring.{side}")
        if self.primary is not None:
            rows = self.rows()
            gradient_rows = [n for n, r in rows.items() if r.gradient]
            forward_rows = [n for n, r in rows.items() if not r.gradient]
            if self.primary.row not in gradient_rows:
                raise ValueError(f"scoring.primary.row: '{self.primary.row}' is not a configured row that uses the "
                                 f"gradient (one of {', '.join(gradient_rows)})")
            if self.primary.baseline not in forward_rows:
                raise ValueError(f"scoring.primary.baseline: '{self.primary.baseline}' is not a configured "
                                 f"forward-only row (one of {', '.join(forward_rows)})")
        return self

    def rows(self) -> dict[str, Row]:
        """Every row this configuration produces, by name, in the order they are scored and reported."""
        return configured(list(self.forward), list(self.gradient),
                          [(g.name, list(g.members), g.rule) for g in self.fusion.groups])


def check_scoring(value: DetectorsConfig) -> DetectorsConfig:
    """Unknown detectors and bad hyper-parameters on either side are errors (``ValueError`` naming the key)."""
    check_detector_config(value.forward, "scoring.forward")
    check_detector_config(value.gradient, "scoring.gradient")
    return value
