"""The project's own networks, with the interface every classifier here has: ``model(x, return_features=True) ->
(logits, penultimate features)`` and a ``head`` (the last Linear): a small CNN for the embedded default and the CIFAR
ResNets (:mod:`lowgrad.models` registers them as ``model.arch`` names and adapts any other network to it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
