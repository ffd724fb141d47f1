"""Architectures and checkpoint import: foreign layouts, clear errors, real shared checkpoints."""

from __future__ import annotations

import pytest
import torch

from lowgrad.config import DataConfig
from lowgrad.data import load_dataset, to_tensor_batch
from lowgrad.errors import CheckpointError
from lowgrad.models import build_model, load_checkpoint
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
    with pytest.raises(CheckpointError, match="cannot be loaded with weights_only=True"):
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
