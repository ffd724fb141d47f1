"""Typed, strict configuration: ``params.yaml`` parsed into pydantic models.

Unknown keys are errors (a typo must never silently fall back to a default).
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from lowgrad.errors import ConfigError
from lowgrad.paths import PARAMS, TRAINED
from lowgrad.route import SKETCH_SETTINGS, Route


Int = StrictInt  # counts: `true` and "40" are refused, not read as 1 and 40
RESERVED_SET_NAMES = {"mean"}  # the metrics' mean row


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


SourceKind = Literal["npz", "npz_jpeg", "image_folder", "photo_patches", "torchvision"]
# the embedded default's raw inputs, committed in the repository (data/embedded/README.md)
EMBEDDED_DIGITS = "data/embedded/digits.npz"
EMBEDDED_PHOTOS = "data/embedded/photos"
BY_NAME = ("torchvision", "timm")  # model.arch: <library>:<model name> (lowgrad.models builds them)
USER_MODULE = "module"  # model.arch: module:<import.path>:<callable>, the user's own nn.Module
USER_CODE = "architectures"  # where that code lives: a DVC dependency of every stage that builds the model
_REPLACED_SOURCES = {  # earlier source kinds that read scikit-learn's bundled copies: now files DVC can track
    "sklearn_digits": f"{{source: npz, path: {EMBEDDED_DIGITS}}}",
    "sklearn_photos": f"{{source: photo_patches, path: {EMBEDDED_PHOTOS}, n: ...}}",
}


class DatasetConfig(_Strict):
    """One image set, read from ``path`` (a file or a folder, relative to the project or absolute): ``prepare@<set>``
    lists it as a DVC dependency, so replacing its content reruns the set and everything downstream of it.
    ``id_train`` and ``id_test`` are required names; every other name is an OOD set."""

    source: SourceKind
    path: str = Field(min_length=1, description="the input: an .npz file, an image folder, a torchvision root")
    classes: list[Int] | None = None
    split: Literal["all", "train", "test"] = "all"
    test_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    max_samples: Int | None = Field(None, gt=0)
    n: Int | None = Field(None, gt=0, description="photo_patches only: number of patches (default 1000)")
    resize: bool = False
    dataset: str | None = Field(None, description="torchvision only: a torchvision.datasets class, e.g. SVHN")
    subset: str = Field("test", description="torchvision only: train | test | a split name the class accepts")
    download: bool = Field(False, description="torchvision only: download into 'path' when missing")

    @model_validator(mode="before")
    @classmethod
    def _replaced_source(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("source") in _REPLACED_SOURCES:
            raise ValueError(f"source '{value['source']}' is now a file in the repository that DVC tracks: write "
                             f"{_REPLACED_SOURCES[value['source']]} (data/embedded/README.md)")
        return value

    @model_validator(mode="after")
    def _check_source_options(self) -> "DatasetConfig":
        if (self.source == "torchvision") != (self.dataset is not None):
            raise ValueError("'dataset' (a torchvision.datasets class name) goes with source 'torchvision' only")
        if self.download and self.source != "torchvision":
            raise ValueError("'download' applies to source 'torchvision' only")
        if self.n is not None and self.source != "photo_patches":
            raise ValueError("'n' (the number of patches) applies to source 'photo_patches' only")
        return self

    @property
    def n_patches(self) -> int:
        return self.n if self.n is not None else 1000


class InputConfig(_Strict):
    """How images enter the model: their size and channels, and the normalisation (``x / 255``, then mean / std)."""

    image_size: Int = Field(gt=0)
    channels: Literal[1, 3]
    resize_short_side: Int | None = Field(
        None, gt=0, description="resize: short side to this, then centre-crop image_size (ImageNet 256 -> 224)"
    )
    mean: list[Annotated[float, Field(allow_inf_nan=False)]]
    std: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]]

    @model_validator(mode="after")
    def _check_input(self) -> "InputConfig":
        if self.resize_short_side is not None and self.resize_short_side < self.image_size:
            raise ValueError("data.resize_short_side must be at least data.image_size")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("data.mean and data.std need one value per channel")
        return self


class DataConfig(InputConfig):
    """The input settings and the pipeline's image sets."""

    datasets: dict[str, DatasetConfig]

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        for key in ("id_train", "id_test"):
            if key not in self.datasets:
                raise ValueError(f"data.datasets needs an '{key}' entry")
        if len(self.datasets) < 3:
            raise ValueError("data.datasets needs at least one OOD set besides id_train and id_test")
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
    """``checkpoint``: a state_dict file (relative to the project or absolute), a DVC dependency of stage ``model``,
    so a checkpoint replaced in place reruns ``model`` and everything after it; ``models/trained.pt`` (the default)
    is the ``train`` stage's model of ``arch`` trained on ``id_train``."""

    arch: str = Field(min_length=1)  # registered in lowgrad.models, torchvision:<name>, timm:<name>, module:<path>:<callable>
    num_classes: Int = Field(gt=1)
    checkpoint: str = Field(TRAINED, min_length=1)

    @field_validator("arch")
    @classmethod
    def _arch_form(cls, value: str) -> str:
        """The form only (the names are known once torch is imported: :func:`lowgrad.models.build_model` checks them,
        and the flow does before any stage runs)."""
        library, sep, name = value.partition(":")
        if sep and library == USER_MODULE:
            path, _, factory = name.partition(":")
            parts = path.split(".")
            if not (factory.isidentifier() and all(part.isidentifier() for part in parts)):
                raise ValueError(f"'{value}': module:<import.path>:<callable>, e.g. "
                                 f"module:{USER_CODE}.tiny_convnet:TinyConvNet")
            if parts[0] != USER_CODE or len(parts) < 2:
                raise ValueError(f"'{value}': your model's code must live under {USER_CODE}/ in the project (a DVC "
                                 f"dependency of every stage that builds the model, so editing it reruns them): "
                                 f"module:{USER_CODE}.<file>:<callable>")
        elif sep and (library not in BY_NAME or not name or ":" in name):
            raise ValueError(f"'{value}': a built-in architecture name, torchvision:<model>, timm:<model> or "
                             f"module:{USER_CODE}.<file>:<callable>")
        return value

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _a_file(cls, value: Any) -> Any:
        if value is None:
            raise ValueError(f"model.checkpoint must name a file: a state_dict, or {TRAINED} to train "
                             "model.arch on id_train (null no longer means 'train': DVC tracks the file)")
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"model.checkpoint is empty: name a state_dict file, or {TRAINED} to train "
                             "model.arch on id_train")
        if isinstance(value, str) and "://" in value:
            raise ValueError(f"'{value}' is a URL: nothing is fetched at run time (a result must belong to a file DVC "
                             "can hash); download it first and set model.checkpoint to the file")
        return value

    @property
    def trains(self) -> bool:
        """The checkpoint is the ``train`` stage's model."""
        import os.path

        return os.path.normpath(self.checkpoint) == TRAINED


class TrainConfig(_Strict):
    """The train stage's recipe (``lowgrad.train``): SGD, optionally inside SAM, with a schedule and an augmentation.
    The defaults are the embedded default's recipe; ``configs/cifar10_resnet18_authors.yaml`` states the paper's."""

    epochs: Int = Field(20, gt=0)
    batch_size: Int = Field(64, gt=0)
    lr: float = Field(0.01, gt=0, description="peak learning rate (onecycle) or starting one (cosine, step, constant)")
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    schedule: Literal["onecycle", "cosine", "step", "constant"] = Field(
        "onecycle", description="per step: onecycle (torch's OneCycleLR), cosine (annealed to 0), step (lr x 0.2 "
        "after 30 %, 60 % and 80 % of the epochs), constant")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="torch's convention: 1 - s + s/C on the true class")
    sam_rho: float = Field(0.0, ge=0, description="SAM's neighbourhood radius (Foret et al. 2021); 0 = plain SGD")
    sam_adaptive: bool = Field(False, description="adaptive SAM (Kwon et al. 2021): the ascent scaled by |w|")
    augment: Literal["batch_shift", "crop_flip"] = Field(
        "batch_shift", description="batch_shift: one random shift of the whole batch by up to image_size/8 pixels; "
        "crop_flip: each image its own random crop (zero padding image_size/8) and a left-right flip with p = 1/2")


class GradientConfig(_Strict):
    sketch: Literal[SKETCH_SETTINGS] = "none"  # one per route of lowgrad.route.ROUTES (none: exact gradients)
    sketch_rank: Int = Field(16, gt=0)
    sketch_dim: Int = Field(8192, gt=0, description="dense: columns of the Gaussian projection; exact_nfk: CountSketch buckets")
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


class ClusterConfig(_Strict):
    """Where extraction runs. ``scheduler: null``: in this process; ``local``: a ``dask.distributed``
    LocalCluster of ``n_workers`` processes; ``tcp://host:8786``: an existing Dask scheduler (workers must see
    the project directory at the same path). Results do not depend on it, so DVC does not track it."""

    scheduler: str | None = None
    n_workers: Int = Field(2, gt=0)
    threads_per_worker: Int = Field(1, gt=0)
    shards: Int = Field(0, ge=0, description="0 = one shard per worker")


class Params(_Strict):
    """The whole params file. ``scoring`` is only a mapping here: its schema (fusion groups, the bootstrap, and the
    detectors' options through the registry of :mod:`lowgrad.detectors`) lives in :mod:`lowgrad.options`, which only
    the score and report stages load, so editing a detector never changes the code that the expensive stages depend
    on. ``parse_params`` validates everything unless asked
    for the pipeline part only (``scoring=False``, what the other stages do)."""

    seed: Int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    gradient: GradientConfig = GradientConfig()
    subspace: SubspaceConfig = SubspaceConfig()
    scoring: dict[str, Any] = Field(description="its schema: lowgrad.options (see scored_params_schema)")
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _runnable_route(self) -> "Params":
        try:
            Route.from_params(self)  # the one place that decides the gradient route
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return self


def _model_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:  # noqa: D103
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


def format_validation_error(err: ValidationError, source: str, schema: type[BaseModel] | None = None) -> str:
    """One line per problem: ``params.yaml: subspace.kk: unknown key (did you mean 'k'?)``."""
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            valid = _model_fields(schema or Params, item["loc"])
            hint = difflib.get_close_matches(str(item["loc"][-1]), valid, n=1)
            msg = "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            if loc and msg.startswith(loc + "."):  # the validator already named the full key
                loc = ""
        lines.append(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}")
    return "; ".join(lines)


@functools.cache
def scored_params_schema() -> type[Params]:
    """:class:`Params` with the ``scoring`` section validated by :mod:`lowgrad.options` (imported only here)."""
    from lowgrad.options import DetectorsConfig, check_scoring

    class ScoredParams(Params):
        scoring: DetectorsConfig

        @field_validator("scoring")
        @classmethod
        def _known_detectors(cls, value: DetectorsConfig) -> DetectorsConfig:
            return check_scoring(value)

    return ScoredParams


def parse_params(raw: dict[str, Any], source: str = "params", scoring: bool = True) -> Params:
    """Validate a raw mapping, raising :class:`ConfigError` with one clear line. ``scoring=True``: the whole file,
    ``scoring`` included (:func:`scored_params_schema`); ``False``: all but the ``scoring`` section's
    schema, without importing it (the stages before ``score``)."""
    schema = scored_params_schema() if scoring else Params
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, schema)) from None


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


EXTENDS = "extends"  # a profile's key: the params file it states its differences from (docs/pipeline.md, Profiles)


def _read_mapping(path: Path) -> dict[str, Any]:
    """One params file's own mapping (no ``extends`` resolved), with one-line errors."""
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


def merge_profile(base: Any, profile: Any) -> None:
    """Apply a profile's mapping onto ``base`` in place, the one rule of profiles: mappings merge key by key,
    ``null`` removes the key (a data set dropped, a setting back to lowgrad's default), anything else (a scalar, a
    list) replaces. Works on plain dicts and on ruamel's commented maps (a replaced key takes the profile's
    comment)."""
    comments, own = getattr(base, "ca", None), getattr(profile, "ca", None)
    for key, value in profile.items():
        merged = isinstance(value, dict) and isinstance(base.get(key), dict)
        if value is None:
            base.pop(key, None)
        elif merged:
            merge_profile(base[key], value)
        else:
            base[key] = value
        if comments is None:
            continue
        if not merged:  # ruamel: the comment that explained the base's value would now mislead
            comments.items.pop(key, None)
        if own is not None and key in own.items and key in base:  # a merged section keeps its comment unless the
            comments.items[key] = own.items[key]  # profile has one; a replaced value takes the profile's


def profile_chain(path: str | Path, load: Callable[[Path], Any] = _read_mapping) -> list[tuple[Path, Any]]:
    """``[(file, its own mapping)]`` from the root base to ``path``, following ``extends`` (relative to the file
    that names it); a missing base, a cycle or an ``extends`` that is not a file name is one clear line."""
    chain: list[tuple[Path, Any]] = []
    path = Path(path)
    while True:
        if any(path.resolve() == seen.resolve() for seen, _ in chain):
            names = " -> ".join(str(p) for p, _ in chain)
            raise ConfigError(f"{names} -> {path}: the profiles extend each other in a cycle")
        raw = load(path)
        chain.append((path, raw))
        base = raw.pop(EXTENDS, None)
        if base is None:
            return chain[::-1]
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{path}: {EXTENDS}: must name a params file (relative to {path.parent}), got {base!r}")
        if path.name == PARAMS:
            raise ConfigError(f"{path}: params.yaml cannot use '{EXTENDS}': DVC keys the stages by its values, so it must "
                              f"state every one; keep the profile in its own file and run it with "
                              f"python -m flows.pipeline --params-file <profile>")
        target = path.parent / base
        if target.name == PARAMS:
            raise ConfigError(f"{path}: {EXTENDS}: {base}: a profile cannot extend params.yaml (every run and "
                              f"`dvc exp run -S` rewrite it); extend a file under configs/")
        if not target.is_file():
            raise ConfigError(f"{path}: {EXTENDS}: {base}: no such params file (looked for {target})")
        path = target


def compose(path: str | Path, load: Callable[[Path], Any] = _read_mapping) -> tuple[Any, list[tuple[Path, Any]]]:
    """A params file as one mapping, a profile's ``extends`` chain merged by :func:`merge_profile` (``load``: plain
    dicts, or ruamel's commented maps), and that chain (:func:`profile_chain`)."""
    chain = profile_chain(path, load)
    merged = chain[0][1]
    for _, profile in chain[1:]:
        merge_profile(merged, profile)
    return merged, chain


def read_raw(path: str | Path) -> dict[str, Any]:
    """A params file as one mapping (:func:`compose`)."""
    return compose(path)[0]


def load_params(path: str | Path = PARAMS, overrides: dict[str, Any] | None = None, scoring: bool = True) -> Params:
    """Read, apply dotted ``overrides`` and validate a params file (``scoring``: as in :func:`parse_params`)."""
    raw = read_raw(path)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return parse_params(raw, str(path), scoring)


def raw_route(raw: dict[str, Any]) -> Route:
    """The route a raw params mapping asks for, with the option models' defaults where a key is absent (not
    validated: bench helpers that switch routes)."""
    g = GradientConfig.model_construct(**(raw.get("gradient") or {}))
    s = SubspaceConfig.model_construct(**(raw.get("subspace") or {}))
    return Route.named(g.sketch, s.method)(kernel=s.kernel, basis=s.basis, method=s.method)
