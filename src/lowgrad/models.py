"""Classifiers with a uniform interface: ``model(x, return_features=True) -> (logits, penultimate features)`` and
:func:`head_of` (the last Linear). The built-in ones are :class:`FeatureClassifier` (``forward_features`` + ``head``).

``model.arch`` is one of the :data:`ARCHITECTURES` registered here (a small CNN for the embedded default, the CIFAR
ResNet-18 of the paper, the third-party CIFAR ResNet-20 with "option A" shortcuts, torchvision's ResNet-50), or
``torchvision:<name>`` (any classification model of ``torchvision.models``) or ``timm:<name>`` (when timm is
installed), built by name with random weights (nothing is downloaded; the weights come from ``model.checkpoint``),
or ``module:architectures.<file>:<callable>``, the user's own ``nn.Module`` in the project's ``architectures/``.
A model built by name keeps its own parameter names, so its own checkpoints load as they are; its head is the
``Linear`` layer whose output is the model's output, found on a test batch (:func:`with_head_split`).
Checkpoints load with ``weights_only=True``; foreign layouts (nested ``state_dict``, ``module.`` prefixes, float16)
are normalised (a cast is logged; integer or bool tensors where the model holds floats are refused), and anything
else — a pickled module, a directory, an empty or foreign file, a key or shape mismatch — is one clear error.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lowgrad.config import BY_NAME, USER_CODE, USER_MODULE
from lowgrad.errors import CheckpointError

if TYPE_CHECKING:
    from lowgrad.config import Params

log = logging.getLogger(__name__)


class FeatureClassifier(nn.Module):
    """Base class: ``forward(x) = head(forward_features(x))``."""

    head: nn.Linear

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits, or ``(logits, features)`` when ``return_features`` (one pass for both)."""
        features = self.forward_features(x)
        logits = self.head(features)
        return (logits, features) if return_features else logits


class SmallCNN(FeatureClassifier):
    """Three 3x3 conv layers with BatchNorm, global average pool, linear head (about 14k parameters)."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return x.mean(dim=(2, 3))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = 0
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if shortcut == "projection":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )
            else:  # option A: subsample and zero-pad channels, no parameters
                self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad:
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        else:
            short = self.shortcut(x)
        return F.relu(out + short)


class CifarResNet(FeatureClassifier):
    """CIFAR ResNet: 3x3 stem without max-pool, BasicBlock stages, global average pool, linear head."""

    def __init__(
        self, blocks: list[int], widths: list[int], num_classes: int, shortcut: str, head_name: str
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths), start=1):
            layers = []
            for j in range(n):
                layers.append(_BasicBlock(in_planes, w, 2 if (j == 0 and i > 1) else 1, shortcut))
                in_planes = w
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.n_stages = len(blocks)
        self._head_name = head_name
        setattr(self, head_name, nn.Linear(in_planes, num_classes))

    @property
    def head(self) -> nn.Linear:  # type: ignore[override]
        return getattr(self, self._head_name)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.n_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return x.mean(dim=(2, 3))


Builder = Callable[[int, int], FeatureClassifier]  # (num_classes, in_channels) -> model
ARCHITECTURES: dict[str, Builder] = {}  # model.arch names: the one list (the error for a bad name and the docs read it)


def architecture(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register a builder ``(num_classes, in_channels) -> FeatureClassifier`` as ``model.arch: name``."""

    def add(builder: Builder) -> Builder:
        if name in ARCHITECTURES or ":" in name:
            raise ValueError(f"architecture name '{name}' is taken or has a ':'")
        ARCHITECTURES[name] = builder
        return builder

    return add


def _rgb_only(arch: str, in_channels: int) -> None:
    if in_channels != 3:
        raise CheckpointError(f"model.arch '{arch}' takes 3-channel images (data.channels is {in_channels})")


@architecture("small_cnn")
def _small_cnn(num_classes: int, in_channels: int) -> FeatureClassifier:
    return SmallCNN(num_classes, in_channels)


@architecture("resnet18_cifar")
def _resnet18_cifar(num_classes: int, in_channels: int) -> FeatureClassifier:
    _rgb_only("resnet18_cifar", in_channels)
    return CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, "projection", "fc")


@architecture("resnet20_cifar")
def _resnet20_cifar(num_classes: int, in_channels: int) -> FeatureClassifier:
    _rgb_only("resnet20_cifar", in_channels)
    return CifarResNet([3, 3, 3], [16, 32, 64], num_classes, "option_a", "linear")


@architecture("torchvision_resnet50")
def _torchvision_resnet50(num_classes: int, in_channels: int) -> FeatureClassifier:
    """torchvision's ResNet-50 (its state_dict keys) with the feature / head split; torchvision is imported
    only here (it costs seconds at start-up)."""
    _rgb_only("torchvision_resnet50", in_channels)
    import torchvision

    class TorchvisionResNet50(torchvision.models.ResNet, FeatureClassifier):
        """torchvision's ResNet-50 (same state_dict keys) with the feature / head split."""

        def __init__(self, num_classes: int) -> None:
            super().__init__(torchvision.models.resnet.Bottleneck, [3, 4, 6, 3], num_classes=num_classes)

        @property
        def head(self) -> nn.Linear:  # type: ignore[override]
            return self.fc

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return torch.flatten(self.avgpool(x), 1)

        forward = FeatureClassifier.forward

    return TorchvisionResNet50(num_classes)


class _HeadSplit(nn.Module):
    """Mixed into the class of a model built by name, in front of it: ``forward(x, return_features=True)`` gives the
    model's own logits and the input of its head (:func:`head_of`). It adds nothing else, so no name of the model's
    own (its ``forward_features``, a ``head`` module) is shadowed, and the parameters keep their names."""

    _lowgrad_head_path: str
    _lowgrad_model_forward: Callable[..., torch.Tensor]  # the model class's own forward

    def forward(self, x: torch.Tensor, return_features: bool = False):
        head = head_of(self)
        captured: list[torch.Tensor] = []
        handle = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            logits = type(self)._lowgrad_model_forward(self, x)
        finally:
            handle.remove()
        if not isinstance(logits, torch.Tensor):
            raise CheckpointError(f"the model returns a {type(logits).__name__}, not a tensor of logits, in "
                                  f"{'training' if self.training else 'eval'} mode")
        if len(captured) != 1:
            raise CheckpointError(f"the head '{self._lowgrad_head_path}' ran {len(captured)} times in one forward pass")
        return (logits, captured[0]) if return_features else logits


def head_of(model: nn.Module) -> nn.Linear:
    """The last ``Linear`` layer of a classifier: ``model.head`` of a :class:`FeatureClassifier`, or the head found
    for a model built by name."""
    path = getattr(model, "_lowgrad_head_path", None)
    return model.get_submodule(path) if path is not None else model.head


def with_head_split(model: nn.Module, num_classes: int, arch: str, in_channels: int, image_size: int) -> nn.Module:
    """``model`` (an ``nn.Module`` from images to logits) with the classifier interface the pipeline uses:
    ``model(x, return_features=True) -> (logits, features)`` and :func:`head_of`. Its head is the one
    ``Linear`` layer with ``num_classes`` outputs whose output, on a test batch of two images, is the model's output
    (so nothing may follow it, not even a softmax); the features are that layer's 2-D input. Anything else is one
    :class:`CheckpointError` naming what was found."""
    if isinstance(model, (FeatureClassifier, _HeadSplit)):
        return model
    candidates = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not candidates:
        raise CheckpointError(f"model.arch '{arch}': no Linear layer with {num_classes} outputs (model.num_classes) "
                              "to use as the head")
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in candidates}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda _m, args, out, name=name: outputs[name].append((args[0], out))) for name in candidates]
    was_training = model.training
    try:
        with torch.no_grad():
            logits = model.eval()(torch.randn(2, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0)))
    except Exception as err:
        raise CheckpointError(f"model.arch '{arch}': a test batch of 2 x {in_channels} x {image_size} x {image_size} "
                              f"images fails ({type(err).__name__}: {err}); check data.image_size / data.channels") from None
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, num_classes):
        raise CheckpointError(f"model.arch '{arch}': the model's output is not a (batch, {num_classes}) tensor of logits")
    heads = [name for name, calls in outputs.items()
             if len(calls) == 1 and calls[0][0].dim() == 2 and torch.equal(calls[0][1], logits)]
    if len(heads) != 1:
        raise CheckpointError(f"model.arch '{arch}': cannot tell its head: of the Linear layers with {num_classes} "
                              f"outputs ({', '.join(candidates)}), {len(heads)} produce the model's output from 2-D "
                              "features (the output must be that layer's, with nothing after it)")
    cls = type(model)
    model.__class__ = type(f"{cls.__name__}WithHeadSplit", (_HeadSplit, cls), {"_lowgrad_model_forward": cls.forward})
    model._lowgrad_head_path = heads[0]
    return model


def _closest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    return f" (closest: {', '.join(close)})" if close else ""


def _by_name(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """The ``torchvision:<name>`` / ``timm:<name>`` model with random weights (nothing downloaded)."""
    library, _, name = arch.partition(":")
    if library == "torchvision":
        import torchvision

        known = sorted(torchvision.models.list_models(module=torchvision.models))  # the classification models
        if name not in known:
            raise CheckpointError(f"model.arch '{arch}': not a torchvision classification model{_closest(name, known)}")
        _rgb_only(arch, in_channels)
        extra = {"aux_logits": False} if name in ("googlenet", "inception_v3") else {}  # one output in train mode too
        return _constructed(arch, lambda: torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra))
    try:
        import timm
    except ImportError:
        raise CheckpointError(f"model.arch '{arch}' needs timm, which is not installed: pip install 'lowgrad[timm]'") from None
    known = sorted(timm.list_models())
    if name not in known:
        raise CheckpointError(f"model.arch '{arch}': not a timm model{_closest(name, known)}")
    return _constructed(arch, lambda: timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels))


def _constructed(arch: str, make: Callable[[], nn.Module]) -> nn.Module:
    try:
        return make()
    except Exception as err:  # the library's own refusal (an argument the model does not take, ...)
        raise CheckpointError(f"model.arch '{arch}' cannot be built ({type(err).__name__}: {err})") from None


def _user_module(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """``module:architectures.<file>:<callable>``: the user's own ``nn.Module`` from images to logits. The callable
    (a class or a function) gets the keyword arguments it accepts of ``num_classes`` and ``in_channels``; the file
    must be the project's (``architectures/``, run from the project root), which DVC tracks for every stage that
    builds the model. Its head is found as for a model built by name (:func:`with_head_split`)."""
    _, path, factory_name = arch.split(":")
    root = Path.cwd().resolve()
    if str(root) not in sys.path:  # `python -m stages.<name>` has it; an in-process caller may not
        sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as err:
        if err.name and (path == err.name or path.startswith(err.name + ".")):
            raise CheckpointError(f"model.arch '{arch}': no module {path} ({root / USER_CODE} holds your model's "
                                  f"code: {path.replace('.', '/')}.py)") from None
        raise CheckpointError(f"model.arch '{arch}': importing {path} fails (ModuleNotFoundError: {err})") from None
    except Exception as err:  # the user's code: its own error, in one line
        raise CheckpointError(f"model.arch '{arch}': importing {path} fails ({type(err).__name__}: {err})") from None
    origin = Path(getattr(module, "__file__", "") or "").resolve()
    if not origin.is_relative_to(root / USER_CODE):
        raise CheckpointError(f"model.arch '{arch}': {path} was loaded from {origin}, not from {root / USER_CODE} "
                              "(the code DVC tracks); run from the project root")
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        known = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise CheckpointError(f"model.arch '{arch}': {path} has no callable '{factory_name}'{_closest(factory_name, known)}")
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepted = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    kwargs = {k: v for k, v in {"num_classes": num_classes, "in_channels": in_channels}.items() if takes_any or k in accepted}
    model = _constructed(arch, lambda: factory(**kwargs))
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"model.arch '{arch}': {factory_name}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) "
                              f"returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Instantiate an architecture by its ``params.yaml`` name: a :class:`FeatureClassifier`, or a model built by name
    with the same interface (``model(x, return_features=True)``, :func:`head_of`); ``image_size``: the test batch
    that finds the head of a model built by name."""
    library, sep, _ = arch.partition(":")
    if sep and library in BY_NAME:
        return with_head_split(_by_name(arch, num_classes, in_channels), num_classes, arch, in_channels, image_size)
    if sep and library == USER_MODULE:
        return with_head_split(_user_module(arch, num_classes, in_channels), num_classes, arch, in_channels, image_size)
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unknown model.arch '{arch}'{_closest(arch, list(ARCHITECTURES))}: one of "
                              f"{', '.join(ARCHITECTURES)}, or torchvision:<name> / timm:<name> / "
                              f"module:{USER_CODE}.<file>:<callable>")
    return ARCHITECTURES[arch](num_classes, in_channels)


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict (name -> tensor) or {{'state_dict': ...}}, found a "
                              f"{type(obj).__name__}; save one with torch.save(model.state_dict(), path)")
    return {key.removeprefix("module."): value for key, value in obj.items()}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _load_error(path: Path, err: Exception) -> CheckpointError:
    """One line for what ``torch.load(weights_only=True)`` refused: a pickled object (the usual case, a whole
    ``nn.Module`` saved with ``torch.save(model)``) names the class it needs and how to save a state_dict instead."""
    text = _ANSI.sub("", str(err))
    needed = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if needed:
        return CheckpointError(
            f"{path}: a pickled Python object (it needs {needed.group(1)}), not a state_dict; lowgrad loads weights "
            "only (weights_only=True, so no code in a checkpoint runs). Save the weights with "
            "torch.save(model.state_dict(), path) and point model.checkpoint at that file")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return CheckpointError(f"{path}: cannot be loaded with weights_only=True ({type(err).__name__}"
                           + (f": {first}" if first else "") + ")")


def _checkpoint_file(path: Path) -> None:
    """Refuse what is not a torch checkpoint file before torch tries: a directory, an empty file, or a file that is
    neither a zip archive (``torch.save``'s format) nor a legacy pickle."""
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; model.checkpoint names the state_dict file itself")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with path.open("rb") as handle:
        head = handle.read(4)
    if not head:
        raise CheckpointError(f"{path}: is an empty file (0 bytes), not a checkpoint; was it written completely?")
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise CheckpointError(f"{path}: not a torch checkpoint (it starts with {head!r}; torch.save writes a zip "
                              "archive starting with b'PK'); save one with torch.save(model.state_dict(), path)")


def _dtypes_match(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Floating tensors become the model's float32 (a float16 / bfloat16 / float64 checkpoint, said once); a
    tensor of another kind where the model holds floats (int64 or bool weights) is refused, never cast."""
    wrong = [k for k in expected if expected[k].is_floating_point() and not state[k].is_floating_point()]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{path}: '{k}' is {state[k].dtype} where the model holds {expected[k].dtype} "
                              f"({len(wrong)} such tensors); a checkpoint's weights must be floating point")
    cast = sorted({str(state[k].dtype) for k in expected
                   if expected[k].is_floating_point() and state[k].dtype != expected[k].dtype})
    if cast:
        log.info("%s: %s tensors loaded as %s", path, "/".join(cast), next(iter(expected.values())).dtype)
    return {k: v.to(expected[k].dtype) if expected[k].is_floating_point() else v for k, v in state.items()}


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights (``weights_only=True``) into ``model``; raise :class:`CheckpointError` on any mismatch."""
    path = Path(path)
    _checkpoint_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt / unsafe files
        raise _load_error(path, err) from None
    state = _state_dict_of(obj, path)
    expected = model.state_dict()
    for key in expected:  # older checkpoints predate BatchNorm's step counter, which inference never reads
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = expected[key]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: key layout does not match {type(model).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    wrong = [k for k in expected if expected[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{path}: shape mismatch for '{k}': checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
            f" ({len(wrong)} tensors differ; check model.arch and model.num_classes)"
        )
    model.load_state_dict(_dtypes_match(state, expected, path))
    return model


def save_state_dict(model: nn.Module, path: str | Path) -> None:
    """The model's float tensors on the CPU, written atomically and byte-for-byte reproducibly: torch names the
    archive inside the file after the file, so it is serialised in memory first and the same weights always give
    the same bytes (and DVC sees an unchanged model as unchanged)."""
    import io

    from lowgrad.paths import atomic_path

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def fresh_model(params: "Params") -> nn.Module:
    """The configured architecture, randomly initialised (seed torch first for reproducible weights)."""
    return build_model(params.model.arch, params.model.num_classes, params.data.channels, params.data.image_size)


def load_classifier(params: "Params", root: str | Path = ".") -> nn.Module:
    """The ``model`` stage's weights (``models/model.pt``) in the configured architecture, ``eval()``, on the CPU."""
    from lowgrad.paths import MODEL

    return load_checkpoint(fresh_model(params), Path(root) / MODEL).eval()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with its parameters frozen (what the detectors' forward passes use; the
    per-sample gradients are taken through the original)."""
    import copy

    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def check_finite_state(model: nn.Module, source: str) -> None:
    """Refuse a model whose parameters or buffers (BatchNorm running statistics) hold NaN or infinity, naming
    the first such tensor: such a model would only fail much later, at extraction."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{source}: tensor '{name}' holds {bad} non-finite value(s) (NaN/inf); "
                                  "the model is unusable: use another checkpoint or retrain (lower train.lr)")


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU. On CUDA, TF32 matmuls and convolutions are switched off:
    gradients and projections are computed in true float32, as on the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device: cuda was requested but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(name)
