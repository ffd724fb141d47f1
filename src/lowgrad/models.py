"""The architecture registry: ``model.arch`` to a classifier with the uniform interface ``model(x,
return_features=True) -> (logits, penultimate features)`` and :func:`head_of` (the last Linear). The project's own
networks are :mod:`lowgrad.networks`; checkpoints load through :mod:`lowgrad.checkpoints`.

``model.arch`` is one of the :data:`ARCHITECTURES` registered here (a small CNN for the embedded default, the CIFAR
ResNet-18 of the paper, the third-party CIFAR ResNet-20 with "option A" shortcuts, torchvision's ResNet-50), or
``torchvision:<name>`` (any classification model of ``torchvision.models``) or ``timm:<name>`` (when timm is
installed), built by name with random weights (nothing is downloaded; the weights come from ``model.checkpoint``),
or ``module:architectures.<file>:<callable>``, the user's own ``nn.Module`` in the project's ``architectures/``.
A model built by name keeps its own parameter names, so its own checkpoints load as they are; its head is the
``Linear`` layer whose output is the model's output, found on a test batch (:func:`with_head_split`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lowgrad.checkpoints import load_checkpoint
from lowgrad.config import BY_NAME, USER_CODE, USER_MODULE
from lowgrad.errors import CheckpointError
from lowgrad.networks import CifarResNet, FeatureClassifier, SmallCNN

if TYPE_CHECKING:
    from lowgrad.config import Params



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


DETERMINISTIC = "LOWGRAD_DETERMINISTIC"  # set to 1: CUDA runs repeat bit for bit (slower; docs/routes.md)


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU. On CUDA, TF32 matmuls and convolutions are switched off:
    gradients and projections are computed in true float32, as on the CPU; with ``LOWGRAD_DETERMINISTIC=1`` in the
    environment, torch's deterministic algorithms are switched on too (:func:`deterministic_mode`)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device: cuda was requested but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if os.environ.get(DETERMINISTIC, "0") not in ("", "0"):
        deterministic_mode()
    return torch.device(name)


def deterministic_mode() -> None:
    """Opt-in repeatability on CUDA: deterministic kernels (an operation without one raises instead of varying),
    cuDNN's benchmark off and cuBLAS's fixed workspace. CPU runs are repeatable without it."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read by cuBLAS when its handle is created
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
