"""Architectures and checkpoint import: foreign layouts, clear errors, real shared checkpoints."""

from __future__ import annotations

import pytest
import torch

from lowgrad.config import DataConfig
from lowgrad.data import load_dataset, to_tensor_batch
from lowgrad.errors import CheckpointError
from lowgrad.checkpoints import load_checkpoint
from lowgrad.models import ARCHITECTURES, build_model, head_of, with_head_split
from tests.conftest import DIGITS, shared_file


def test_parameter_counts_match_the_papers_models():
    assert sum(p.numel() for p in build_model("resnet18_cifar", 10).parameters()) == 11_173_962
    assert sum(p.numel() for p in build_model("resnet20_cifar", 10).parameters()) == 269_722
    assert sum(p.numel() for p in build_model("torchvision_resnet50", 1000).parameters()) == 25_557_032


def test_foreign_layout_is_normalised(tmp_path):
    model = build_model("small_cnn", 6, 1)
    nested = {"best_prec1": 1.0, "state_dict": {f"module.{k}": v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}}
    torch.save(nested, tmp_path / "ckpt.th")
    loaded = load_checkpoint(build_model("small_cnn", 6, 1), tmp_path / "ckpt.th")
    for k, v in model.state_dict().items():
        assert loaded.state_dict()[k].dtype == v.dtype
        torch.testing.assert_close(loaded.state_dict()[k], v.half().to(v.dtype) if v.is_floating_point() else v)


def test_checkpoint_errors(tmp_path):
    model = build_model("small_cnn", 6, 1)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(model, tmp_path / "missing.pt")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=r"key layout does not match SmallCNN: \d+ missing"):
        load_checkpoint(model, tmp_path / "wrong.pt")
    torch.save(build_model("small_cnn", 4, 1).state_dict(), tmp_path / "classes.pt")
    with pytest.raises(CheckpointError, match="shape mismatch for 'head.weight'.*model.num_classes"):
        load_checkpoint(model, tmp_path / "classes.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_checkpoint(model, tmp_path / "garbage.pt")


def _cifar_accuracy(arch: str, ckpt: str, mean, std, n: int = 500) -> float:
    cfg = DataConfig(
        image_size=32, channels=3, mean=list(mean), std=list(std),
        datasets={
            "id_train": {"source": "npz", "path": DIGITS},
            "id_test": {"source": "npz_jpeg", "path": str(shared_file("data/cifar10_test_jpeg.npz")), "max_samples": n},
            "o": {"source": "npz", "path": DIGITS},
        },
    )
    test = load_dataset("id_test", cfg, 0)
    model = load_checkpoint(build_model(arch, 10), shared_file(ckpt)).eval()
    with torch.no_grad():
        logits = model(to_tensor_batch(test.images, cfg.mean, cfg.std))
    return float((logits.argmax(1).numpy() == test.labels).mean() * 100)


def test_shared_resnet18_checkpoint_accuracy():
    acc = _cifar_accuracy("resnet18_cifar", "models/resnet18_cifar10_seed0.pt", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert 86.0 < acc < 95.0  # 90.26 % on the full JPEG test set


def test_shared_resnet20_foreign_checkpoint_accuracy():
    acc = _cifar_accuracy("resnet20_cifar", "models/resnet20-12fca82f.th", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert 75.0 < acc < 87.0  # 81.0 % on the full JPEG test set


# -- architectures by name: torchvision:<name>, the head found on a test batch, clear refusals ---------------------


def test_a_torchvision_model_by_name_keeps_its_names_and_its_outputs(tmp_path):
    """``torchvision:<name>``: the model torchvision builds, with its own parameter names (its state_dict loads as
    it is), its own logits, and as features the input of the head torchvision gives it."""
    import torchvision

    torch.manual_seed(0)
    model = build_model("torchvision:mobilenet_v3_small", 10, 3, 32).eval()
    reference = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    torch.save(reference.state_dict(), tmp_path / "tv.pt")
    load_checkpoint(model, tmp_path / "tv.pt")
    assert list(model.state_dict()) == list(reference.state_dict())
    assert head_of(model) is model.classifier[3]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, features = model(x, return_features=True)
        expected = reference(x)
        expected_features = reference.classifier[:3](torch.flatten(reference.avgpool(reference.features(x)), 1))
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(features, expected_features)
    torch.testing.assert_close(head_of(model)(features), logits)
    assert features.shape == (3, 1024)


def test_architecture_names_are_one_registry_with_clear_refusals():
    with pytest.raises(CheckpointError, match=r"unknown model.arch 'resnet18' \(closest: resnet18_cifar") as err:
        build_model("resnet18", 10)
    assert all(name in str(err.value) for name in ARCHITECTURES)  # the message lists the registered names
    with pytest.raises(CheckpointError, match=r"'torchvision:mobilenet_v3_smal': not a torchvision classification "
                                              r"model \(closest: mobilenet_v3_small"):
        build_model("torchvision:mobilenet_v3_smal", 10)
    with pytest.raises(CheckpointError, match="takes 3-channel images"):
        build_model("torchvision:resnet18", 10, 1)
    with pytest.raises(CheckpointError, match=r"needs timm|not a timm model"):
        build_model("timm:not_a_model_name", 10)


class _SoftmaxAfterHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x):
        return torch.softmax(self.fc(self.body(x).mean(dim=(2, 3))), dim=1)


class _TwoHeads(_SoftmaxAfterHead):
    """Two Linear layers that give the same output on the same features: which one is the head is not decidable."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = torch.nn.Linear(4, 5)
        self.aux.load_state_dict(self.fc.state_dict())

    def forward(self, x):
        u = self.body(x).mean(dim=(2, 3))
        self.aux(u)
        return self.fc(u)


class _Plain(_SoftmaxAfterHead):
    def forward(self, x):
        return self.fc(self.body(x).mean(dim=(2, 3)))


def test_a_model_whose_head_cannot_be_told_is_refused():
    with pytest.raises(CheckpointError, match=r"cannot tell its head: of the Linear layers with 5 outputs \(fc\), 0"):
        with_head_split(_SoftmaxAfterHead(), 5, "m", 3, 8)  # its output is a softmax, not a Linear layer's
    with pytest.raises(CheckpointError, match="no Linear layer with 7 outputs"):
        with_head_split(_Plain(), 7, "m", 3, 8)
    with pytest.raises(CheckpointError, match="a test batch of 2 x 3 x 2 x 2 images fails"):
        with_head_split(_Plain(), 5, "m", 3, 2)  # a 3x3 convolution on 2x2 images
    with pytest.raises(CheckpointError, match=r"\(fc, aux\), 2 produce"):
        with_head_split(_TwoHeads(), 5, "m", 3, 8)
    class Aux(_Plain):  # torchvision's googlenet / inception with aux_logits: another output in training mode
        def forward(self, x):
            logits = super().forward(x)
            return (logits, logits) if self.training else logits

    aux = with_head_split(Aux(), 5, "m", 3, 8).train()
    with pytest.raises(CheckpointError, match="returns a tuple, not a tensor of logits, in training mode"):
        aux(torch.randn(2, 3, 8, 8))
    # negative control: the plain model is accepted, its head found, its training mode kept
    model = _Plain().train()
    split = with_head_split(model, 5, "m", 3, 8)
    assert head_of(split) is split.fc and split.training
    x = torch.randn(2, 3, 8, 8)
    logits, features = split(x, return_features=True)
    torch.testing.assert_close(features, split.body(x).mean(dim=(2, 3)))
    torch.testing.assert_close(logits, split.fc(features))


def test_a_timm_model_by_name_keeps_its_names_and_its_outputs(tmp_path):
    """``timm:<name>`` (timm is in the dev extra): timm's model, its own logits and, as features, its pre-logits."""
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[timm]')")
    torch.manual_seed(0)
    model = build_model("timm:resnet18", 10, 3, 32).eval()
    reference = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    torch.save(reference.state_dict(), tmp_path / "timm.pt")
    load_checkpoint(model, tmp_path / "timm.pt")
    assert list(model.state_dict()) == list(reference.state_dict()) and head_of(model) is model.fc
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, features = model(x, return_features=True)
        torch.testing.assert_close(logits, reference(x))
        torch.testing.assert_close(features, reference.forward_head(reference.forward_features(x), pre_logits=True))
    with pytest.raises(CheckpointError, match=r"'timm:resnet1x': not a timm model \(closest: resnet1"):
        build_model("timm:resnet1x", 10)
    grey = build_model("timm:resnet18", 10, 1, 32)  # timm takes the channel count
    assert grey.conv1.in_channels == 1
