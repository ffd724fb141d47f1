"""Extraction sharded over a 2-worker local Dask cluster equals the single-process extraction (exactly:
each chunk is computed by the same code on the same rows, only by another process)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from lowgrad.config import parse_params
from lowgrad.data import load_dataset, save_image_set
from lowgrad.models import build_model
from lowgrad.paths import EXTRACTED, MODEL, PREPARED
from lowgrad.stages.extract import extract
from lowgrad.store import ChunkedStore

from tests.conftest import DIGITS

pytest.importorskip("distributed")


def _params(scheduler):
    return parse_params({
        "seed": 0, "device": "cpu",
        "data": {"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.5], "datasets": {
            "id_train": {"source": "npz", "path": DIGITS, "classes": [0, 1, 2]},
            "id_test": {"source": "npz", "path": DIGITS, "classes": [0, 1, 2], "max_samples": 50},
            "ood": {"source": "npz", "path": DIGITS, "classes": [7]}}},
        "model": {"arch": "small_cnn", "num_classes": 3},
        "gradient": {"chunk_rows": 48, "batch_size": 16},
        "subspace": {"k": 8},
        "scoring": {"forward": {"msp": {}}, "gradient": {"knn": {}}},
        "cluster": {"scheduler": scheduler, "n_workers": 2, "threads_per_worker": 1},
    })


def test_dask_sharded_extraction_equals_single_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = _params(None)
    save_image_set(PREPARED.format(name="id_train"), load_dataset("id_train", params.data, 0))
    torch.manual_seed(0)
    (tmp_path / "models").mkdir()
    torch.save(build_model("small_cnn", 3, 1).state_dict(), MODEL)

    extract(params, "id_train")
    single = tmp_path / "single.zarr"
    shutil.move(EXTRACTED.format(name="id_train"), single)

    extract(_params("local"), "id_train")
    sharded = ChunkedStore.open(EXTRACTED.format(name="id_train"))
    reference = ChunkedStore.open(single)
    assert sharded.n_chunks == 12  # 537 rows / 48: enough chunks for both workers
    by_worker = sharded.group.attrs["chunks_by_worker_pid"]
    assert len(by_worker) == 2 and sorted(sum(by_worker.values(), [])) == list(range(12))
    for name in ("grads", "logits", "features", "labels"):
        np.testing.assert_array_equal(sharded.read(name), reference.read(name))

    # subspace + projection: per-shard partial products reduced on the client (float tolerance: the
    # summation order differs from the single-process pass)
    from lowgrad.paths import SUBSPACE
    from lowgrad.stages.project import project
    from lowgrad.stages.subspace import subspace
    from lowgrad.subspace import GradientSubspace

    params_local, params_dask = _params(None), _params("local")
    subspace(params_local)
    local = GradientSubspace.load(SUBSPACE)
    subspace(params_dask)
    dask = GradientSubspace.load(SUBSPACE)
    np.testing.assert_allclose(dask.normalizer_.scale_, local.normalizer_.scale_, rtol=1e-10)
    np.testing.assert_allclose(dask.singular_values_, local.singular_values_, rtol=1e-8)
    np.testing.assert_allclose(np.abs(dask.components_.T @ local.components_), np.eye(local.k), atol=1e-6)
    project(params_dask, "id_train")
    g_dask = np.load("artifacts/projected/id_train.npy")
    np.testing.assert_allclose(g_dask, local.transform(reference.read("grads")), rtol=1e-4, atol=1e-4)
    phi = dask.normalizer_.transform(reference.read("grads"))
    np.testing.assert_allclose(np.load("artifacts/projected/id_train.sqnorm.npy"), (phi**2).sum(1), rtol=1e-10)
