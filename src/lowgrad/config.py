"""Typed, strict configuration: ``params.yaml`` parsed into pydantic models.

Unknown keys are errors (a typo must never silently fall back to a default).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from lowgrad.errors import ConfigError


Int = StrictInt  # counts: `true` and "40" are refused, not read as 1 and 40
RESERVED_SET_NAMES = {"mean"}  # the metrics' mean row


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


SourceKind = Literal["sklearn_digits", "sklearn_photos", "npz", "npz_jpeg", "image_folder", "torchvision"]


class DatasetConfig(_Strict):
    """One image set. ``id_train`` and ``id_test`` are required names; every other name is an OOD set."""

    source: SourceKind
    path: str | None = None
    classes: list[Int] | None = None
    split: Literal["all", "train", "test"] = "all"
    test_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    max_samples: Int | None = Field(None, gt=0)
    n: Int = Field(1000, gt=0, description="number of patches (sklearn_photos only)")
    resize: bool = False
    dataset: str | None = Field(None, description="torchvision only: a torchvision.datasets class, e.g. SVHN")
    subset: str = Field("test", description="torchvision only: train | test | a split name the class accepts")
    download: bool = Field(False, description="torchvision only: download into 'path' when missing")

    @model_validator(mode="after")
    def _check_path(self) -> "DatasetConfig":
        needs_path = self.source in ("npz", "npz_jpeg", "image_folder", "torchvision")
        if needs_path and not self.path:
            raise ValueError(f"source '{self.source}' needs a 'path'")
        if not needs_path and self.path:
            raise ValueError(f"source '{self.source}' takes no 'path'")
        if (self.source == "torchvision") != (self.dataset is not None):
            raise ValueError("'dataset' (a torchvision.datasets class name) goes with source 'torchvision' only")
        if self.download and self.source != "torchvision":
            raise ValueError("'download' applies to source 'torchvision' only")
        return self


class DataConfig(_Strict):
    image_size: Int = Field(gt=0)
    channels: Literal[1, 3]
    resize_short_side: Int | None = Field(
        None, gt=0, description="resize: short side to this, then centre-crop image_size (ImageNet 256 -> 224)"
    )
    mean: list[float]
    std: list[Annotated[float, Field(gt=0)]]
    datasets: dict[str, DatasetConfig]

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        for key in ("id_train", "id_test"):
            if key not in self.datasets:
                raise ValueError(f"data.datasets needs an '{key}' entry")
        if len(self.datasets) < 3:
            raise ValueError("data.datasets needs at least one OOD set besides id_train and id_test")
        if self.resize_short_side is not None and self.resize_short_side < self.image_size:
            raise ValueError("data.resize_short_side must be at least data.image_size")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("data.mean and data.std need one value per channel")
        for name in self.datasets:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"dataset name '{name}' may only hold letters, digits and '_'")
            if name.lower() in RESERVED_SET_NAMES:
                raise ValueError(f"dataset name '{name}' is reserved (the metrics' mean over OOD sets); rename the set")
        return self

    @property
    def ood_names(self) -> list[str]:
        return [n for n in self.datasets if n not in ("id_train", "id_test")]


class ModelConfig(_Strict):
    arch: Literal["small_cnn", "resnet18_cifar", "resnet20_cifar", "torchvision_resnet50"]
    num_classes: Int = Field(gt=1)
    checkpoint: str | None = None


class TrainConfig(_Strict):
    epochs: Int = Field(20, gt=0)
    batch_size: Int = Field(64, gt=0)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(5e-4, ge=0)


class GradientConfig(_Strict):
    sketch: Literal["none", "kronecker", "dense"] = "none"
    sketch_rank: Int = Field(16, gt=0)
    sketch_dim: Int = Field(8192, gt=0, description="dense: columns of the Gaussian projection")
    factor_samples: Int = Field(512, gt=1, description="kernel samples for the NFK Kronecker factors")
    params: Literal["all"] | list[str] = "all"
    max_params: Int = Field(2_000_000, gt=0)
    batch_size: Int = Field(64, gt=0)
    chunk_rows: Int = Field(256, gt=0)
    dtype: Literal["float32", "float16"] = "float32"


class SubspaceConfig(_Strict):
    kernel: Literal["nfk", "ntk"] = "nfk"
    basis: Literal["pca", "average_gradient"] = "pca"
    method: Literal["randomized", "incremental", "exact_randomized"] = Field(
        "randomized", description="randomized / incremental: PCA of the stored gradients; exact_randomized: "
        "matrix-free, every pass recomputes exact per-sample gradients (nothing stored; meant for GPUs)"
    )
    k: Int = Field(32, gt=0)
    oversample: Int = Field(10, ge=0)
    power_iters: Int = Field(4, ge=0)


def member_detector(member: str) -> tuple[str, bool]:
    """A row or fusion member's ``(detector name, is gradient)``: ``grad_knn`` -> ``("knn", True)``."""
    return (member.removeprefix("grad_"), True) if member.startswith("grad_") else (member, False)


class FusionGroup(_Strict):
    """Detectors fused with equal weights. Members name forward detectors as in ``scoring.forward`` and
    gradient ones with the ``grad_`` prefix (``[vim, knn, grad_residual]``)."""

    name: str
    members: list[str] = Field(min_length=2)
    rule: Literal["zscore", "fisher"] = "zscore"

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value.replace("_", "").isalnum():
            raise ValueError(f"fusion group name '{value}' may only hold letters, digits and '_'")
        return value

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
        return self


class ClusterConfig(_Strict):
    """Where extraction runs. ``scheduler: null``: in this process; ``local``: a ``dask.distributed``
    LocalCluster of ``n_workers`` processes; ``tcp://host:8786``: an existing Dask scheduler (workers must see
    the project directory at the same path). Results do not depend on it, so DVC does not track it."""

    scheduler: str | None = None
    n_workers: Int = Field(2, gt=0)
    threads_per_worker: Int = Field(1, gt=0)
    shards: Int = Field(0, ge=0, description="0 = one shard per worker")


class Params(_Strict):
    seed: Int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    gradient: GradientConfig = GradientConfig()
    subspace: SubspaceConfig = SubspaceConfig()
    scoring: DetectorsConfig
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _runnable_route(self) -> "Params":
        from lowgrad.route import Route  # the one place that decides the gradient route

        try:
            Route.from_params(self)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return self

    @field_validator("scoring")
    @classmethod
    def _known_detectors(cls, value: DetectorsConfig) -> DetectorsConfig:
        from lowgrad.options import check_detector_config

        check_detector_config(value.forward, "scoring.forward")
        check_detector_config(value.gradient, "scoring.gradient")
        return value


def _model_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Names of the fields that are valid at ``loc`` (for 'did you mean' hints)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return list(getattr(current, "model_fields", {})) if current is not None else []


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``params.yaml: subspace.kk: unknown key (did you mean 'k'?)``."""
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            valid = _model_fields(Params, item["loc"])
            hint = difflib.get_close_matches(str(item["loc"][-1]), valid, n=1)
            msg = "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            if loc and msg.startswith(loc + "."):  # the validator already named the full key
                loc = ""
        lines.append(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}")
    return "; ".join(lines)


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a raw mapping into :class:`Params`, raising :class:`ConfigError` with one clear line."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw['a']['b'] = value`` for ``dotted = 'a.b'`` (the ``dvc exp run -S`` convention)."""
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def get_dotted(tree: Any, dotted: str) -> tuple[bool, Any]:
    """``(found, tree[a][b])`` for ``dotted = 'a.b'``."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False, None
        tree = tree[part]
    return True, tree


def drop_dotted(tree: dict[str, Any], dotted: str) -> None:
    """Remove ``tree[a][b]`` for ``dotted = 'a.b'`` if it is there."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.get(part) or {}
    tree.pop(leaf, None)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"duplicate key '{key}' (line {key_node.start_mark.line + 1}): each key may appear once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> Python objects, with one-line errors for malformed YAML and duplicate keys."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None


def read_raw(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the params file ({err})") from None
    raw = parse_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return raw


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read, apply dotted ``overrides`` and validate a params file."""
    raw = read_raw(path)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return parse_params(raw, str(path))
