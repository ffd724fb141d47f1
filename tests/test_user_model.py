"""Your own model: ``model.arch: module:architectures.<file>:<callable>`` (docs/pipeline.md, "Your model: architectures").

The class is built from the project's ``architectures/``, its head and features are found on a test batch and
checked against the plain module's own computation; every refusal is one line; and the whole pipeline runs on it
(trained by the ``train`` stage) on the exact, Kronecker and matrix-free routes."""

from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lowgrad.config import ModelConfig, parse_params
from lowgrad.errors import CheckpointError
from lowgrad.models import build_model, head_of
from tests.conftest import ROOT
from tests.test_pipeline import TINY

EXAMPLE = "module:architectures.tiny_convnet:TinyConvNet"


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty project directory holding a copy of ``architectures/``, as the working directory (the stages run
    from the project root), with no ``architectures`` module left cached by an earlier test."""
    shutil.copytree(ROOT / "architectures", tmp_path / "architectures", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(tmp_path)
    for name in [m for m in sys.modules if m == "architectures" or m.startswith("architectures.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *[p for p in sys.path if Path(p or ".").resolve() != ROOT]])
    return tmp_path


def _user_file(project: Path, name: str, text: str) -> str:
    (project / "architectures" / f"{name}.py").write_text(text)
    return f"module:architectures.{name}"


def test_the_example_builds_with_its_own_head_features_and_names(project):
    model = build_model(EXAMPLE, 6, in_channels=1, image_size=8).eval()
    from architectures.tiny_convnet import TinyConvNet  # the user's class, used as plain PyTorch

    plain = TinyConvNet(num_classes=6, in_channels=1).eval()
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    plain.load_state_dict(model.state_dict())  # the parameters keep their names: own checkpoints load as they are
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    logits, features = model(x, return_features=True)
    with torch.no_grad():
        torch.testing.assert_close(logits, plain(x), rtol=0, atol=0)
        torch.testing.assert_close(features, plain.body(x), rtol=0, atol=0)  # the classifier's input
    assert head_of(model) is model.classifier


def test_a_function_taking_only_num_classes_is_a_factory(project):
    arch = _user_file(project, "by_function", "from torch import nn\n"
                      "def make(num_classes):\n"
                      "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))\n")
    model = build_model(f"{arch}:make", 4, in_channels=1, image_size=8)
    assert head_of(model).out_features == 4 and head_of(model) is model[3]


@pytest.mark.parametrize("name,text,factory,fragment", [
    ("missing", None, "Net", "no module architectures.missing"),
    ("typo", "class Net: pass\n", "Nett", "has no callable 'Nett' (closest: Net)"),
    ("not_a_module", "def Net(num_classes):\n    return 3\n", "Net", "Net(num_classes=4) returned a int"),
    ("raises", "def Net(num_classes):\n    raise ValueError('bad width')\n", "Net", "cannot be built (ValueError: bad width)"),
    ("imports_missing", "import not_a_package_anywhere\n", "Net",
     "importing architectures.imports_missing fails (ModuleNotFoundError"),
    ("buggy", "raise RuntimeError('my bug')\n", "Net", "fails (RuntimeError: my bug)"),
    ("no_head", "from torch import nn\ndef Net(num_classes):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))\n",
     "Net", "no Linear layer with 4 outputs"),
])
def test_each_user_model_problem_is_one_line(project, name, text, factory, fragment):
    if text is not None:
        _user_file(project, name, text)
    with pytest.raises(CheckpointError) as err:
        build_model(f"module:architectures.{name}:{factory}", 4, in_channels=1, image_size=8)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_code_outside_architectures_or_not_the_projects_is_refused(project, tmp_path_factory, monkeypatch):
    for arch in ("module:lowgrad.models:SmallCNN", "module:architectures:Net", "module:architectures.x:y:z"):
        with pytest.raises(ValueError, match="module:architectures"):
            ModelConfig(arch=arch, num_classes=3)
    # the same module name found in another directory (an old copy on sys.path) is not the code DVC tracks
    other = tmp_path_factory.mktemp("elsewhere")
    shutil.copytree(project / "architectures", other / "architectures")
    (other / "architectures" / "stray.py").write_text("from architectures.tiny_convnet import TinyConvNet as Net\n")
    monkeypatch.syspath_prepend(str(other))
    with pytest.raises(CheckpointError, match=r"was loaded from .*elsewhere.* not from .*architectures"):
        build_model("module:architectures.stray:Net", 4, in_channels=1, image_size=8)


@pytest.mark.parametrize("route,change", [
    ("exact", {}),
    ("kronecker", {"gradient": {"sketch": "kronecker", "sketch_rank": 4, "factor_samples": 64}}),
    ("matrix_free", {"subspace": {"method": "exact_randomized", "k": 8, "oversample": 6, "power_iters": 1}}),
    ("exact_nfk", {"gradient": {"sketch": "exact_nfk", "sketch_dim": 256, "factor_samples": 64}}),
    ("dense", {"gradient": {"sketch": "dense", "sketch_dim": 256, "factor_samples": 64}}),
])
def test_the_pipeline_on_your_model(project, route, change):
    """Train the example on the tiny digits set, then every stage up to score in one process, as ``dvc repro``
    would run them."""
    from lowgrad.pipeline import stage_bodies

    shutil.copytree(ROOT / "data/embedded", project / "data/embedded")
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    raw = json.loads(json.dumps(TINY))
    raw["model"]["arch"] = EXAMPLE
    raw["scoring"]["k_sweep"] = []
    raw["scoring"]["bootstrap"]["replicates"] = 100
    for section, values in change.items():
        raw[section] = {**raw[section], **values}
    params = parse_params(raw)
    for stage, body, args in stage_bodies(params, project):
        if stage != "report":  # metrics.json is score's; the report reads it only
            body(params, *args)
    info = json.loads((project / "models/model.json").read_text())
    w = 16  # TinyConvNet's width: conv 1 -> w, BatchNorm, conv w -> 2w, BatchNorm, Linear 2w -> 3 (with its bias)
    assert info["arch"] == EXAMPLE and info["n_parameters"] == 9 * w + 2 * w + 9 * w * 2 * w + 4 * w + 2 * w * 3 + 3
    metrics = json.loads((project / "report/metrics.json").read_text())
    assert {"knn", "grad_knn", "grad_residual", "fused_react_grad_knn"} <= set(metrics["methods"])
    assert metrics["id_accuracy"] > 50  # trained: better than chance (3 classes)
    g_low = np.load(project / "artifacts/projected/id_test.npy")
    assert g_low.shape == (90, 8) and np.isfinite(g_low).all()
    _saved_detector_round_trip(project, set(metrics["methods"]))
    _the_estimator_fits_what_the_pipeline_fitted(project, raw)
    if route == "exact":
        _lowgrad_score_command(project)
        _your_code_is_read_from_the_project_only(project)
    _replaced_files_are_refused(project, route)


def _the_estimator_fits_what_the_pipeline_fitted(project: Path, raw: dict) -> None:
    """``lowgrad.LowGrad`` on the user's plain ``nn.Module`` (the trained weights) and the run's prepared arrays, with
    the run's params: every row's thresholds and scores equal the pipeline's (rtol 1e-5, the same seeds); saved and
    loaded it scores the same; a replaced basis or another model is refused with one line."""
    from architectures.tiny_convnet import TinyConvNet

    from lowgrad import LowGrad
    from lowgrad.data import load_image_set
    from lowgrad.errors import DetectorError

    plain = TinyConvNet(num_classes=3, in_channels=1)
    plain.load_state_dict(torch.load(project / "models/model.pt", weights_only=True))
    prepared = {name: load_image_set(project / f"data/prepared/{name}.npz") for name in ("id_train", "id_test", "digits_7to9")}
    options = {k: v for k, v in raw.items() if k in ("seed", "device", "gradient", "subspace", "scoring")}
    options["data"] = {k: v for k, v in raw["data"].items() if k != "datasets"}
    det = LowGrad(plain, **options).fit(prepared["id_train"].images, prepared["id_train"].labels,
                                        test=(prepared["id_test"].images, prepared["id_test"].labels))
    saved = json.loads((project / "artifacts/detector/detector.json").read_text())["thresholds"]
    assert det.rows_ == list(saved)
    np.testing.assert_allclose([det.thresholds_[r] for r in saved], list(saved.values()), rtol=1e-5, atol=1e-7)
    stored = np.load(project / "artifacts/scores.npz")
    images = prepared["digits_7to9"].images
    scores = det.score_samples(images)
    for row, s in scores.items():
        ref = stored[f"{row}/digits_7to9"]
        np.testing.assert_allclose(s, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=row)
    assert not np.allclose(scores["grad_knn"], stored["grad_knn/id_test"][: len(images)])  # negative control
    det.save(project / "fitted")
    back = LowGrad.load(project / "fitted", model=plain)
    for row, s in back.score_samples(images).items():
        np.testing.assert_array_equal(s, scores[row], err_msg=row)
    other = TinyConvNet(num_classes=3, in_channels=1)  # untrained weights
    with pytest.raises(DetectorError, match="the model given is not the one this detector was fitted with") as err:
        LowGrad.load(project / "fitted", model=other)
    assert "\n" not in str(err.value)
    with pytest.raises(DetectorError, match="pass it, LowGrad.load"):
        LowGrad.load(project / "fitted")  # fitted on a model given in Python: no arch to rebuild it from
    (project / "fitted/artifacts/subspace/subspace.npz").write_bytes(b"replaced")
    with pytest.raises(DetectorError, match="subspace.npz is not the one this detector was fitted with"):
        LowGrad.load(project / "fitted", model=plain)


def _saved_detector_round_trip(project: Path, rows: set[str]) -> None:
    """``OODDetector.load(run).score(images)`` of id_test and the OOD set: the pipeline's stored scores, for every
    forward, gradient and fused row (relative difference at most 1e-4); ``predict`` flags below the threshold. The
    loaded detector is the fitted estimator, built around no image set of its own (no placeholder)."""
    from lowgrad import LowGrad, OODDetector
    from lowgrad.data import load_image_set
    from lowgrad.errors import DetectorError

    detector = OODDetector.load(project)
    assert type(detector) is LowGrad and set(detector.rows) == rows == set(detector.rows_)
    assert detector._scorer._extractor.images is None
    with pytest.raises(DetectorError, match="load it without model="):
        OODDetector.load(project, model=torch.nn.Linear(2, 2))
    with pytest.raises(DetectorError, match="copy that folder"):  # a loaded detector holds no fitted model to save
        detector.save(project / "resaved")
    assert not (project / "resaved").exists()
    stored = np.load(project / "artifacts/scores.npz")
    for name in ("id_test", "digits_7to9"):
        images = load_image_set(project / f"data/prepared/{name}.npz").images
        scores = detector.score(images)
        for row, s in scores.items():
            ref = stored[f"{row}/{name}"]
            np.testing.assert_allclose(s, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=f"{row} on {name}")
        assert not np.allclose(detector.score(images[::-1], rows=["grad_knn"])["grad_knn"], stored[f"grad_knn/{name}"])
    plain = images[..., 0] if images.shape[-1] == 1 else images  # greyscale as N x H x W
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(plain)),
                                         batch_size=detector.params.gradient.batch_size)  # the extractor's batches:
    np.testing.assert_allclose(detector.score(loader, rows=["grad_knn"])["grad_knn"],  # others round differently
                               detector.score(images, rows=["grad_knn"])["grad_knn"], rtol=1e-6)
    _shared_by_threads(detector, {name: load_image_set(project / f"data/prepared/{name}.npz").images
                                  for name in ("id_test", "digits_7to9")})
    forward = detector.score(images, rows=["knn", "msp"])  # forward rows only: no gradients computed
    for row, s in forward.items():
        np.testing.assert_allclose(s, stored[f"{row}/digits_7to9"], rtol=1e-4, atol=1e-6, err_msg=row)
    flagged = detector.predict(images, row="grad_residual")  # the OOD set
    np.testing.assert_array_equal(flagged, stored["grad_residual/digits_7to9"] < detector.thresholds["grad_residual"])
    assert np.mean(stored["grad_residual/id_test"] < detector.thresholds["grad_residual"]) <= 0.05


def _shared_by_threads(detector, sets: dict[str, np.ndarray]) -> None:
    """Four threads score four different sets through one detector at once: each gets exactly its serial scores
    (before the lock, the exact route's functional_call swapped the one model's parameters under the others)."""
    from concurrent.futures import ThreadPoolExecutor

    work = [sets["id_test"], sets["digits_7to9"], sets["id_test"][::-1].copy(), sets["digits_7to9"][:37]]
    serial = [detector.score(images) for images in work]
    barrier = threading.Barrier(len(work))

    def together(images):
        barrier.wait()  # all four calls start at once
        return detector.score(images)

    with ThreadPoolExecutor(len(work)) as pool:
        concurrent = list(pool.map(together, work))
    for alone, shared in zip(serial, concurrent):
        assert alone.keys() == shared.keys()
        for row in alone:
            np.testing.assert_array_equal(shared[row], alone[row], err_msg=row)


def _lowgrad_score_command(project: Path) -> None:
    """The console script on the OOD set: one score per image and row, in CSV and JSON; a bad row is one line."""
    import csv
    import subprocess

    script = Path(sys.executable).parent / "lowgrad"
    run = lambda *args: subprocess.run([str(script), "score", "--run", str(project), "--images",  # noqa: E731
                                        "data/prepared/digits_7to9.npz", *args], capture_output=True, text=True)
    proc = run("--out", "scores.csv")
    assert proc.returncode == 0, proc.stderr
    with open(project / "scores.csv") as fh:
        table = list(csv.reader(fh))
    rows = json.loads((project / "report/metrics.json").read_text())["methods"]
    assert table[0] == ["image", *rows] and len(table) == 1 + 90
    stored = np.load(project / "artifacts/scores.npz")
    np.testing.assert_allclose([float(r[table[0].index("grad_knn")]) for r in table[1:]], stored["grad_knn/digits_7to9"],
                               rtol=1e-4)
    proc = run("--rows", "knn,grad_residual", "--out", "scores.json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads((project / "scores.json").read_text())
    assert set(out["rows"]) == {"knn", "grad_residual"} and len(out["rows"]["knn"]["flagged"]) == 90
    for args, fragment in ((["--rows", "knn,nope", "--out", "bad.csv"], "error: unknown row(s) nope"),
                           (["--out", "bad.txt"], "error: --out bad.txt: write a .csv or a .json file"),
                           (["--out", "nowhere/bad.csv"], "error: --out nowhere/bad.csv: the folder nowhere does not")):
        proc = run(*args)
        assert proc.returncode == 1 and proc.stderr.startswith(fragment) and proc.stderr.count("\n") == 1, proc.stderr
    (project / "broken.npz").write_bytes(b"not an archive")
    for images, fragment in (("missing.npz", "error: images not found: missing.npz"),
                             ("broken.npz", "error: broken.npz: not a readable .npz file")):
        proc = subprocess.run([str(script), "score", "--run", str(project), "--images", images, "--out", "bad.csv"],
                              capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stderr.startswith(fragment) and proc.stderr.count("\n") == 1, proc.stderr
    proc = subprocess.run([str(script), "score", "--run", str(project / "nothing"), "--images", "broken.npz", "--out",
                           "bad.csv"], capture_output=True, text=True)
    assert proc.returncode == 1 and "no saved detector" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not list(project.glob("bad*"))


def _your_code_is_read_from_the_project_only(project: Path) -> None:
    """A ``module:`` model is imported from the working directory's architectures/: loading the run from elsewhere is
    refused (another project's file of that name would build another model); an edit of the code is refused too."""
    import os

    from lowgrad import OODDetector
    from lowgrad.errors import DetectorError

    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    try:
        with pytest.raises(DetectorError, match=r"the model is your own code .* run this from"):
            OODDetector.load(project)
    finally:
        os.chdir(project)
    code = project / "architectures/tiny_convnet.py"
    original = code.read_text()
    code.write_text(original + "\n# edited after the run\n")
    with pytest.raises(DetectorError, match="architectures is not the one this detector was fitted with"):
        OODDetector.load(project)
    code.write_text(original)


def _replaced_files_are_refused(project: Path, route: str) -> None:
    """A model, a basis V or the sketch factors replaced after ``score`` ran: loading the detector is refused with one
    line."""
    import zarr

    from lowgrad import OODDetector
    from lowgrad.errors import DetectorError

    basis = zarr.open_array(str(project / "artifacts/subspace/subspace.zarr"), mode="r+")
    original = basis[0, 0]
    basis[0, 0] = original + 1.0
    with pytest.raises(DetectorError, match="subspace.zarr is not the one this detector was fitted with"):
        OODDetector.load(project)
    basis[0, 0] = original
    OODDetector.load(project)  # restored: loads again
    if route in ("kronecker", "exact_nfk", "dense"):  # the sketched routes: their NFK scale is in the factors
        factors = project / "artifacts/sketch/factors.npz"
        original_factors = factors.read_bytes()
        with np.load(factors) as z:
            np.savez(factors, **{k: z[k] * 1.01 for k in z.files})
        with pytest.raises(DetectorError, match="factors.npz is not the one this detector was fitted with"):
            OODDetector.load(project)
        factors.write_bytes(original_factors)
    state = torch.load(project / "models/model.pt", weights_only=True)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, project / "models/model.pt")
    with pytest.raises(DetectorError, match="models/model.pt is not the one this detector was fitted with"):
        OODDetector.load(project)
