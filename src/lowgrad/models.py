"""Classifiers with a uniform split: ``forward_features(x)`` (penultimate) and ``head`` (last Linear).

Architectures: a small CNN for the embedded default, the CIFAR ResNet-18 of the paper, the third-party
CIFAR ResNet-20 ("option A" shortcuts) and torchvision's ResNet-50. Checkpoints load with
``weights_only=True``; foreign layouts (nested ``state_dict``, ``module.`` prefixes, float16) are normalised
and any key or shape mismatch is a clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lowgrad.errors import CheckpointError

if TYPE_CHECKING:
    from lowgrad.config import Params


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


def _torchvision_resnet50(num_classes: int) -> FeatureClassifier:
    """torchvision's ResNet-50 (its state_dict keys) with the feature / head split; torchvision is imported
    only here (it costs seconds at start-up)."""
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


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> FeatureClassifier:
    """Instantiate an architecture by its ``params.yaml`` name."""
    if arch == "small_cnn":
        return SmallCNN(num_classes, in_channels)
    if in_channels != 3:
        raise CheckpointError(f"model.arch '{arch}' takes 3-channel images (data.channels is {in_channels})")
    if arch == "resnet18_cifar":
        return CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, "projection", "fc")
    if arch == "resnet20_cifar":
        return CifarResNet([3, 3, 3], [16, 32, 64], num_classes, "option_a", "linear")
    if arch == "torchvision_resnet50":
        return _torchvision_resnet50(num_classes)
    raise CheckpointError(f"unknown model.arch '{arch}'")


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict (name -> tensor) or {{'state_dict': ...}}")
    out = {}
    for key, value in obj.items():
        key = key.removeprefix("module.")
        out[key] = value.float() if value.is_floating_point() else value
    return out


def load_checkpoint(model: FeatureClassifier, path: str | Path) -> FeatureClassifier:
    """Load weights (``weights_only=True``) into ``model``; raise :class:`CheckpointError` on any mismatch."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt / unsafe files
        raise CheckpointError(f"{path}: cannot be loaded with weights_only=True ({type(err).__name__}: {err})") from None
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
    model.load_state_dict(state)
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


def fresh_model(params: "Params") -> FeatureClassifier:
    """The configured architecture, randomly initialised (seed torch first for reproducible weights)."""
    return build_model(params.model.arch, params.model.num_classes, params.data.channels)


def load_classifier(params: "Params", root: str | Path = ".") -> FeatureClassifier:
    """The ``model`` stage's weights (``models/model.pt``) in the configured architecture, ``eval()``, on the CPU."""
    from lowgrad.paths import MODEL

    return load_checkpoint(fresh_model(params), Path(root) / MODEL).eval()


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
