"""The whole pipeline (every stage up to score, in one process as ``dvc repro`` runs them, then the saved detector)
on architectures users bring: torchvision's ``mobilenet_v3_small`` (depthwise convolutions, squeeze-excitation,
hardswish) by name, and a small torchvision ``VisionTransformer`` (LayerNorm, attention, a class token) through
``module:architectures.<file>:<callable>``, each on the routes that take it; the Kronecker sketch refuses the ViT
with one line naming the layer. Inputs: the embedded digits, resized to 16 x 16 and read as RGB."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from lowgrad.config import parse_params
from lowgrad.errors import LowgradError
from tests.conftest import ROOT
from tests.test_pipeline import TINY
from tests.test_user_model import _saved_detector_round_trip

pytestmark = pytest.mark.slow
VIT = "module:architectures.small_vit:SmallViT"
VIT_FILE = '''"""A small torchvision VisionTransformer: 16 x 16 images in 4 x 4 patches, two layers."""
from torchvision.models import VisionTransformer


def SmallViT(num_classes):
    return VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=num_classes)
'''
KRONECKER = {"gradient": {"sketch": "kronecker", "sketch_rank": 4, "factor_samples": 64}}
MATRIX_FREE = {"subspace": {"method": "exact_randomized", "k": 8, "oversample": 6, "power_iters": 1}}


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project directory with the embedded inputs and an ``architectures/small_vit.py``, as the working
    directory, with no ``architectures`` module cached by an earlier test."""
    shutil.copytree(ROOT / "data/embedded", tmp_path / "data/embedded")
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "architectures").mkdir()
    (tmp_path / "architectures/small_vit.py").write_text(VIT_FILE)
    monkeypatch.chdir(tmp_path)
    for name in [m for m in sys.modules if m == "architectures" or m.startswith("architectures.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *[p for p in sys.path if Path(p or ".").resolve() != ROOT]])
    return tmp_path


def _params(arch: str, change: dict):
    raw = json.loads(json.dumps(TINY))
    if arch.startswith("torchvision:mobilenet"):
        raw["model"]["checkpoint"] = CALIBRATED
    raw["data"].update(image_size=16, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    for (name, spec), n in zip(raw["data"]["datasets"].items(), (60, 50, 50)):
        spec.update(resize=True, max_samples=n)  # 8 x 8 greyscale digits -> 16 x 16 RGB; fewer than TINY's
    raw["model"]["arch"] = arch
    raw["train"] = {"epochs": 2, "batch_size": 32, "lr": 0.05}
    raw["scoring"]["k_sweep"] = []
    raw["scoring"]["bootstrap"]["replicates"] = 100
    raw["gradient"]["batch_size"] = 16
    for section, values in change.items():
        raw[section] = {**raw[section], **values}
    return parse_params(raw)


def _run(params, project: Path) -> None:
    from lowgrad.pipeline import stage_bodies

    for stage, body, args in stage_bodies(params, project):
        if stage == "train" and params.model.checkpoint == CALIBRATED:
            _calibrated_checkpoint(params, project)
        if stage != "report":
            body(params, *args)


CALIBRATED = "models/calibrated.pt"


def _calibrated_checkpoint(params, project: Path) -> None:
    """Random weights with BatchNorm statistics measured on id_train (a train-mode pass with cumulative averages).
    MobileNet-V3's BatchNorm momentum is 0.01: a few epochs of training on 150 images leave its running statistics
    near their initial values and the eval-mode network at chance (measured: 32 % on 3 classes after 20 epochs),
    with degenerate gradients. Weights need not be good here, only a working network."""
    import torch

    from lowgrad.data import load_image_set, to_tensor_batch
    from lowgrad.models import fresh_model

    torch.manual_seed(0)
    model = fresh_model(params)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    x = to_tensor_batch(load_image_set(project / "data/prepared/id_train.npz").images, params.data.mean, params.data.std)
    with torch.no_grad():
        model.train()(x)
    (project / CALIBRATED).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), project / CALIBRATED)


@pytest.mark.parametrize("arch,route,change", [
    ("torchvision:mobilenet_v3_small", "kronecker", KRONECKER),
    (VIT, "exact", {}),
    (VIT, "matrix_free", MATRIX_FREE),
])
def test_the_pipeline_and_its_saved_detector_on_this_architecture(project, arch, route, change):
    _run(_params(arch, change), project)
    info = json.loads((project / "models/model.json").read_text())
    assert info["arch"] == arch
    metrics = json.loads((project / "report/metrics.json").read_text())
    for row in ("knn", "grad_knn", "grad_residual", "fused_react_grad_knn"):
        assert np.isfinite(metrics["methods"][row]["digits_7to9"]["auroc"]), row
    _saved_detector_round_trip(project, set(metrics["methods"]))


def test_the_kronecker_sketch_refuses_the_vit_in_one_line_naming_the_layer(project):
    with pytest.raises(LowgradError) as err:
        _run(_params(VIT, KRONECKER), project)
    message = str(err.value)
    assert "\n" not in message and "'class_token' of a VisionTransformer;" in message and "LayerNorm" in message, message
    assert "gradient.sketch: none" in message and "exact_randomized" in message  # the routes that take it
    assert not (project / "artifacts/extract").exists()  # refused before any extraction
