"""An example of your own model for ``model.arch: module:architectures.tiny_convnet:TinyConvNet``.

The contract (docs/pipeline.md, "Your model: architectures"): a class or function in a file under ``architectures/`` that
takes the keyword arguments it wants of ``num_classes`` and ``in_channels`` and returns a ``torch.nn.Module``
whose ``forward(images)`` returns ``(batch, num_classes)`` logits from the output of one ``nn.Linear`` layer with
``num_classes`` outputs (the head: nothing may follow it). Its input is the penultimate feature vector the
forward detectors use. Plain PyTorch: nothing here imports lowgrad.
"""

from torch import nn


class TinyConvNet(nn.Module):
    """Two 3x3 convolutions with BatchNorm, global average pooling, a linear classifier."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, images):
        return self.classifier(self.body(images))
