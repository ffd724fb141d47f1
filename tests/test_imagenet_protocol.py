"""The ImageNet protocol file (configs/imagenet_resnet50.yaml) end to end on a tiny ImageFolder tree this
test writes itself: torchvision ResNet-50 from a local weights file, Resize(256) + CenterCrop(224), the
Kronecker sketch over all 25.6 M parameters, the average-gradient basis, every detector, the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowgrad import paths, pipeline
from lowgrad.config import load_params
from lowgrad.data import load_image_set, resize_center_crop

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _write_tree(root: Path, folders: dict[str, int], rng: np.random.Generator) -> None:
    """``folders``: relative folder -> number of JPEGs of random sizes (ImageNet images are not square)."""
    for folder, n in folders.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            h, w = rng.integers(230, 330, size=2)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"img_{i:03d}.JPEG", quality=90)


def test_imagenet_protocol_on_a_tiny_image_folder(tmp_path, monkeypatch):
    import torchvision

    rng = np.random.default_rng(0)
    classes = ["n01440764", "n01443537", "n01484850"]
    _write_tree(tmp_path / "imagenet/train", {c: 5 for c in classes}, rng)
    _write_tree(tmp_path / "imagenet/val", {c: 2 for c in classes}, rng)
    _write_tree(tmp_path / "ood/iNaturalist", {"images": 4}, rng)  # MOS layout: one folder of images
    _write_tree(tmp_path / "ood/dtd/images", {"banded": 2, "blotchy": 2}, rng)
    torch.manual_seed(0)
    stand_in = torchvision.models.resnet50()  # stands in for IMAGENET1K_V1: random weights, BatchNorm statistics
    for bn in (m for m in stand_in.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.momentum = None  # cumulative average over the calibration batch below
    with torch.no_grad():
        stand_in.train()(torch.randn(8, 3, 224, 224))  # of random images, so eval-mode activations stay finite
    torch.save(stand_in.state_dict(), tmp_path / "resnet50.pth")

    overrides = {
        "device": "cpu",
        "model.checkpoint": str(tmp_path / "resnet50.pth"),
        "data.datasets": {
            "id_train": {"source": "image_folder", "path": str(tmp_path / "imagenet/train"), "resize": True},
            "id_test": {"source": "image_folder", "path": str(tmp_path / "imagenet/val"), "resize": True},
            "inaturalist": {"source": "image_folder", "path": str(tmp_path / "ood/iNaturalist"), "resize": True},
            "textures": {"source": "image_folder", "path": str(tmp_path / "ood/dtd/images"), "resize": True},
        },
        "gradient.factor_samples": 4,
        "gradient.batch_size": 8,
        "gradient.chunk_rows": 8,
        "scoring.probe.epochs": 2,
        "scoring.min_ood_samples": 4,  # the tiny OOD folders hold 4 images each (a real run keeps the default 50)
    }
    params = load_params(ROOT / "configs/imagenet_resnet50.yaml", overrides)
    assert params.model.arch == "torchvision_resnet50" and params.subspace.basis == "average_gradient"
    assert params.gradient.sketch == "kronecker" and params.data.resize_short_side == 256
    monkeypatch.chdir(tmp_path)

    for name in params.data.datasets:
        pipeline.BODIES["prepare"](params, name)
    train = load_image_set(paths.PREPARED.format(name="id_train"))
    assert train.images.shape == (15, 224, 224, 3)
    np.testing.assert_array_equal(np.bincount(train.labels), [5, 5, 5])
    first = np.asarray(Image.open(sorted((tmp_path / "imagenet/train" / classes[0]).iterdir())[0]).convert("RGB"))
    np.testing.assert_array_equal(train.images[0], resize_center_crop(first, 224, 3, short_side=256))

    pipeline.BODIES["model"](params)
    info = json.loads(Path(paths.MODEL_INFO).read_text())
    assert info["n_parameters"] == 25_557_032
    pipeline.BODIES["factors"](params)
    for name in params.data.datasets:
        pipeline.BODIES["extract"](params, name)
    pipeline.BODIES["subspace"](params)
    for name in params.data.datasets:
        pipeline.BODIES["project"](params, name)
    pipeline.BODIES["score"](params)
    pipeline.BODIES["report"](params)

    g_low = np.load(paths.PROJECTED.format(name="id_test"))
    assert g_low.shape == (6, 3) and np.isfinite(g_low).all()  # one average-gradient direction per bank class
    metrics = json.loads(Path(paths.METRICS).read_text())
    assert {"knn", "grad_knn", "mahalanobis", "grad_mahalanobis", "vim", "fused_react_grad_knn"} <= set(metrics["methods"])
    assert metrics["mean_over"] == ["inaturalist", "textures"] and metrics["small_sets"] == {}
    for table in metrics["methods"].values():
        assert set(table) == {"inaturalist", "textures", "mean"}
        assert all(np.isfinite(v) for key, v in table["mean"].items() if key != "ci")
    assert metrics["k_sweep"] == {}
    assert "| knn | yes |" in Path(paths.REPORT).read_text()
