"""A checkpoint is an input DVC versions: replaced in place it reruns the model stage and everything after it, and a
teammate who pulls another person's results but holds another model gets their own model's results."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lowgrad.paths import sha256
from tests.test_pipeline import TINY, _git, dvc, ran_stages, set_param, status_stages

pytestmark = pytest.mark.slow
DOWNSTREAM_OF_MODEL = {"model", "factors", "subspace", "score", "report"} | {
    f"{s}@{d}" for s in ("extract", "project") for d in TINY["data"]["datasets"]}


def _redrawn_head(source: Path, dest: Path, seed: int) -> None:
    """A different model: the checkpoint with its linear head drawn again."""
    import torch

    state = torch.load(source, weights_only=True)
    g = torch.Generator().manual_seed(seed)
    state["head.weight"] = torch.randn(state["head.weight"].shape, generator=g)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, dest)


def _accuracy(root: Path, checkpoint: Path) -> float:
    """The ID test accuracy of a checkpoint, computed here (not by the pipeline)."""
    import torch

    from lowgrad.data import to_tensor_batch
    from lowgrad.checkpoints import load_checkpoint
    from lowgrad.models import build_model

    model = load_checkpoint(build_model("small_cnn", 3, 1), checkpoint).eval()
    with np.load(root / "data/prepared/id_test.npz") as z:
        images, labels = z["images"], z["labels"]
    with torch.no_grad():
        predicted = model(to_tensor_batch(images, [0.5], [0.5])).argmax(1).numpy()
    return float((predicted == labels).mean() * 100)


def test_a_checkpoint_replaced_in_place_reruns_the_model_and_all_after_it(team_a, tmp_path):
    """A's finished project (model X at ckpt/model.pt); the file replaced in place by another model."""
    project = Path(shutil.copytree(team_a[0], tmp_path / "a", symlinks=True))
    checkpoint = project / "ckpt/model.pt"
    before = json.loads((project / "models/model.json").read_text())
    assert status_stages(project) == set()
    _redrawn_head(checkpoint, checkpoint, seed=3)  # same path, other content
    assert status_stages(project) == {"model"}
    assert ran_stages(dvc(project, "repro")) == DOWNSTREAM_OF_MODEL
    info = json.loads((project / "models/model.json").read_text())
    assert info["checkpoint"] == "ckpt/model.pt" and info["checkpoint_sha256"] != before["checkpoint_sha256"]
    assert info["id_test_accuracy"] == pytest.approx(_accuracy(project, checkpoint))
    assert info["id_test_accuracy"] != pytest.approx(before["id_test_accuracy"])
    metrics = json.loads((project / "report/metrics.json").read_text())
    assert metrics["id_accuracy"] == pytest.approx(info["id_test_accuracy"])
    # provenance names the new checkpoint, as DVC hashed it
    assert metrics["provenance"]["inputs"]["model.checkpoint"]["path"] == "ckpt/model.pt"
    assert metrics["provenance"]["inputs"]["model.checkpoint"]["md5"] == hashlib.md5(checkpoint.read_bytes()).hexdigest()
    assert sha256(checkpoint) == info["checkpoint_sha256"]


@pytest.fixture(scope="module")
def team_a(tiny_finished, tmp_path_factory) -> tuple[Path, Path, dict]:
    """Teammate A: model X at ckpt/model.pt (outside git) run and committed, outputs and run cache pushed to remote
    'runcache'. Returns A's checkout, the trained checkpoint and X's model.json."""
    base = tmp_path_factory.mktemp("team")
    project = Path(shutil.copytree(tiny_finished, base / "a", symlinks=True))
    (project / ".gitignore").write_text("ckpt/\n")  # a checkpoint each teammate keeps outside git
    trained = shutil.copy(project / "models/trained.pt", base / "trained.pt")
    _redrawn_head(trained, project / "ckpt/model.pt", seed=10)  # X
    set_param(project, "model.checkpoint", "ckpt/model.pt")
    dvc(project, "remote", "add", "runcache", str(base / "remote-runcache"))
    dvc(project, "repro")
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "A: model X")
    dvc(project, "push", "-r", "runcache", "--run-cache")
    return project, Path(trained), json.loads((project / "models/model.json").read_text())


def test_a_teammate_with_another_checkpoint_gets_results_of_their_model(team_a, tmp_path):
    """A (model X at ckpt/model.pt, outside git) ran and pushed; B clones, puts model Y at the same path, pulls
    A's outputs with the run cache (the case where a stale result could come back: pulling outputs alone is
    test_pipeline's teammate clone) and reproduces: B's model stage reruns and every result is Y's."""
    project, trained, x_info = team_a
    clone = tmp_path / "clone_b"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    assert not (clone / "ckpt").exists()
    _redrawn_head(trained, clone / "ckpt/model.pt", seed=11)  # Y
    dvc(clone, "pull", "-r", "runcache", "--run-cache", check=False)  # what A pushed
    assert "model" in status_stages(clone)
    ran = ran_stages(dvc(clone, "repro"))
    assert DOWNSTREAM_OF_MODEL <= ran
    info = json.loads((clone / "models/model.json").read_text())
    assert info["checkpoint_sha256"] == sha256(clone / "ckpt/model.pt") != x_info["checkpoint_sha256"]
    assert info["id_test_accuracy"] == pytest.approx(_accuracy(clone, clone / "ckpt/model.pt"))
    assert json.loads((clone / "report/metrics.json").read_text())["id_accuracy"] == pytest.approx(info["id_test_accuracy"])
