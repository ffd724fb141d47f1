"""The saved detector (``artifacts/detector``, :mod:`lowgrad.saved_detector`): every registered detector, on both
sides, fusion members and their calibration, saved and restored without refitting; a damaged or replaced file is
refused with one line. The round trip through the whole pipeline (``OODDetector.load(...).score`` against the
stored scores, on the exact, Kronecker and matrix-free routes) and ``lowgrad score`` are in
``tests/test_user_model.py``, which runs those pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowgrad.config import parse_params
from lowgrad.detectors import Head, detector_names
from lowgrad.errors import DetectorError
from lowgrad.models import build_model
from lowgrad.paths import COMPONENTS, MODEL, SUBSPACE
from lowgrad.paths import DETECTOR_ARRAYS as ARRAYS, DETECTOR_META as META
from lowgrad.saved_detector import check_artifact, load_fitted, read_meta, save_fitted
from lowgrad.scoring import ScoringContext, fusion_plan, run_all
from tests.conftest import DIGITS


def _run(tmp_path):
    """Every registered detector on both sides, two fusion groups (one with a model-dependent member), fitted by
    ``run_all`` on a small CNN's outputs; the run's files it belongs with are stand-in bytes."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 3, 1).eval()
    rng = np.random.default_rng(0)
    images = {name: torch.randn(n, 1, 8, 8) for name, n in (("id_train", 90), ("id_test", 30), ("ood", 30))}
    sets = {}
    for name, x in images.items():
        with torch.no_grad():
            logits, feats = model(x, return_features=True)
        g_low = rng.standard_normal((len(x), 6))
        sets[name] = {"name": name, "logits": logits.numpy(), "features": feats.numpy(), "labels": np.arange(len(x)) % 3,
                      "g_low": g_low, "phi_sqnorm": (g_low**2).sum(1) + rng.uniform(0.5, 2.0, len(x))}
    forward = {name: {} for name in detector_names(False)} | {"knn": {"k": 3}, "vim": {"dim": 4}}
    gradient = {name: {} for name in detector_names(True)} | {"knn": {"k": 3}}
    params = parse_params({
        "data": {"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.5], "datasets": {
            name: {"source": "npz", "path": DIGITS} for name in sets}},
        "model": {"arch": "small_cnn", "num_classes": 3},
        "scoring": {"forward": forward, "gradient": gradient, "fusion": {"groups": [
            {"name": "odin_grad_knn", "members": ["odin", "grad_knn"]},
            {"name": "knn_grad_residual", "members": ["knn", "grad_residual", "grad_mahalanobis"], "rule": "fisher"}]}},
    })
    ctx = lambda: ScoringContext(forward_head=Head.from_linear(model.head), num_classes=3, model_forward=model,  # noqa: E731
                                 input_std=(0.5,), load_images=lambda name: images[name])
    with torch.inference_mode(False):
        scores, _, fitted = run_all(params, sets, ctx())
    for path in (MODEL, SUBSPACE, f"{COMPONENTS}/c/0/0"):  # the basis V is a folder (zarr): one chunk file here
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(path.encode())
    save_fitted(fitted, params, {label: s["id_test"] for label, s in scores.items()}, tmp_path)
    return params, sets, scores, fitted, ctx


def _no_fitting(monkeypatch) -> None:
    """Every registered detector's ``fit`` and the probe's training raise: what runs after this cannot refit."""
    import lowgrad.probe
    import lowgrad.scoring
    from lowgrad.detectors import REGISTRY

    def refuse(*args, **kwargs):
        raise AssertionError("refitted")

    for registration in REGISTRY.values():
        monkeypatch.setattr(registration.cls, "fit", refuse)
    monkeypatch.setattr(lowgrad.probe, "train_probe", refuse)
    monkeypatch.setattr(lowgrad.scoring, "train_probe", refuse)


def test_every_detector_and_fusion_row_scores_the_same_after_saving(tmp_path, monkeypatch):
    params, sets, scores, fitted, ctx = _run(tmp_path)
    assert len(fitted.rows) == len(detector_names(False)) + len(detector_names(True))  # every registered detector
    _no_fitting(monkeypatch)  # restored, never refitted
    meta = check_artifact(tmp_path)
    restored = load_fitted(tmp_path, ctx(), meta, params)
    plan = fusion_plan(params.scoring.fusion.groups)
    for name in ("id_test", "ood"):
        data = dict(sets[name])
        with torch.inference_mode(False):
            again = restored.fitted.scores(data, ctx(), plan)
        assert set(again) == set(scores)
        for label, s in again.items():
            np.testing.assert_array_equal(s, scores[label][name], err_msg=label)
    for label, s in scores.items():  # thresholds at 95 % TPR on id_test: 95 % of id_test at or above, for every row
        assert np.mean(s["id_test"] >= restored.thresholds[label]) >= 0.95
        assert np.mean(s["id_test"] > restored.thresholds[label]) < 0.95  # the largest such threshold
        np.testing.assert_array_equal(restored.id_test_scores[label], s["id_test"])


def test_restored_rows_use_the_saved_state_not_a_refit(tmp_path):
    """Negative control: a restored row's state is what was saved. Changing a saved array changes its scores, and a
    row restored without its state cannot score at all."""
    params, sets, scores, fitted, ctx = _run(tmp_path)
    meta = check_artifact(tmp_path)
    restored = load_fitted(tmp_path, ctx(), meta, params).fitted
    knn = restored.rows["grad_knn"].detector
    knn.bank_ = knn.bank_[::-1][:10]  # another bank
    knn._index = None
    assert not np.allclose(knn.score_samples(sets["id_test"]["g_low"]), scores["grad_knn"]["id_test"])
    meta["rows"]["mahalanobis"]["state"] = []
    bare = load_fitted(tmp_path, ctx(), meta, params).fitted.rows["mahalanobis"]
    with pytest.raises(AttributeError):
        bare.score(sets["id_test"], ctx())


def test_a_fitted_attribute_that_is_not_an_array_cannot_be_saved(tmp_path):
    params, sets, scores, fitted, ctx = _run(tmp_path)
    fitted.rows["knn"].detector.index_ = object()
    with pytest.raises(TypeError, match="knn: fitted attribute index_ is not an array"):
        save_fitted(fitted, params, {label: s["id_test"] for label, s in scores.items()}, tmp_path)


@pytest.mark.parametrize("replace,fragment", [
    (MODEL, "models/model.pt is not the one this detector was fitted with"),
    (f"{COMPONENTS}/c/0/0", "subspace.zarr is not the one this detector was fitted with"),
    (ARRAYS, "arrays.npz is not the one this detector was fitted with"),
])
def test_a_replaced_file_is_refused_in_one_line(tmp_path, replace, fragment):
    _run(tmp_path)
    check_artifact(tmp_path)  # the untouched artifact passes
    (tmp_path / replace).write_bytes(b"replaced")  # a chunk of V: the folder's digest covers its files
    with pytest.raises(DetectorError, match=fragment) as err:
        check_artifact(tmp_path)
    assert "\n" not in str(err.value)


def test_a_missing_or_unfinished_artifact_is_refused_in_one_line(tmp_path):
    with pytest.raises(DetectorError, match=r"no saved detector .*dvc repro score"):
        check_artifact(tmp_path)
    _run(tmp_path)
    (tmp_path / MODEL).unlink()
    with pytest.raises(DetectorError, match="models/model.pt is missing"):
        check_artifact(tmp_path)
    (tmp_path / META).write_text("{not json")
    with pytest.raises(DetectorError, match="is not a saved detector's metadata"):
        check_artifact(tmp_path)



def test_an_artifact_saved_by_other_scoring_code_or_incomplete_is_refused(tmp_path):
    import json

    _run(tmp_path)
    meta = json.loads((tmp_path / META).read_text())
    assert "lowgrad/kronecker.py" in meta["code_sha256"] and "lowgrad/detectors.py" in meta["code_sha256"]
    meta["code_sha256"]["lowgrad/kronecker.py"] = "0" * 64  # as if written before an edit of the sketch
    (tmp_path / META).write_text(json.dumps(meta))
    with pytest.raises(DetectorError, match=r"saved by other lowgrad code \(lowgrad/kronecker.py differ"):
        check_artifact(tmp_path)
    del meta["thresholds"]
    (tmp_path / META).write_text(json.dumps(meta))
    with pytest.raises(DetectorError, match="lacks thresholds: not a complete saved detector"):
        read_meta(tmp_path)


def test_arrays_replaced_between_check_and_load_are_refused_and_load_reads_again(tmp_path, monkeypatch):
    """A rerun of ``score`` swapping the detector's folder between the digest check and the read: ``load_fitted``
    checks the bytes it parses (never thresholds of one run with arrays of another); ``OODDetector.load`` (the
    estimator's, through ``FittedDetector.load``) reads again when detector.json changed meanwhile, and keeps a refusal whose detector.json did not change."""
    from lowgrad import api, fitted

    params, _, _, _, ctx = _run(tmp_path)
    meta = check_artifact(tmp_path)
    original = (tmp_path / ARRAYS).read_bytes()
    np.savez(tmp_path / ARRAYS, other=np.zeros(1))
    with pytest.raises(DetectorError, match="arrays.npz changed while it was read") as err:
        load_fitted(tmp_path, ctx(), meta, params)
    assert "\n" not in str(err.value)
    (tmp_path / ARRAYS).write_bytes(original)
    assert set(load_fitted(tmp_path, ctx(), meta, params).fitted.rows) == set(read_meta(tmp_path)["rows"])

    calls = []

    def swapped_once(cls, root, device, model=None):
        calls.append(1)
        if len(calls) == 1:  # the folder is replaced while this read runs
            (root / META).write_text((root / META).read_text() + " ")
            raise DetectorError("arrays.npz changed while it was read")
        return "reloaded"

    monkeypatch.setattr(fitted.FittedDetector, "_load_once", classmethod(swapped_once))
    assert fitted.FittedDetector.load(tmp_path) == "reloaded" and len(calls) == 2
    calls.clear()
    monkeypatch.setattr(fitted.FittedDetector, "_load_once", classmethod(
        lambda cls, root, device, model=None: calls.append(1) or (_ for _ in ()).throw(DetectorError("own"))))
    with pytest.raises(DetectorError, match="own"):  # negative control: nothing changed, so no second read
        api.OODDetector.load(tmp_path)  # the estimator's load reads through FittedDetector.load
    assert len(calls) == 1
