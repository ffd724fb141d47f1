"""``lowgrad.LowGrad``, the estimator (docs/python.md): the documented examples run as written, every input form
(arrays, tensors, a Dataset, a DataLoader, an image folder) fits the same detector, and misuse is one line. Its
scores equal the pipeline's on every route: ``tests/test_user_model.py``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from lowgrad.errors import ConfigError, DataError, DetectorError
from tests.conftest import DIGITS, ROOT

OPTIONS = {"data": {"mean": [0.5], "std": [0.5]}, "subspace": {"k": 6, "oversample": 4, "power_iters": 1},
           "gradient": {"chunk_rows": 40, "batch_size": 16},
           "scoring": {"forward": {"knn": {"k": 3}, "energy": {}}, "gradient": {"knn": {"k": 3}, "residual": {}},
                       "fusion": {"groups": [{"name": "knn_grad_knn", "members": ["knn", "grad_knn"]}]}}}


def python_examples(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _digits(classes=(0, 1, 2), n: int = 60, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    with np.load(DIGITS) as z:
        keep = np.flatnonzero(np.isin(z["labels"], classes))[offset : offset + n]
        return z["images"][keep], z["labels"][keep].astype(np.int64)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _cifar_shaped(images: np.ndarray) -> np.ndarray:
    """8 x 8 greyscale digits as 32 x 32 x 3 images (what the ResNet-18 example takes)."""
    return np.repeat(np.repeat(images, 4, axis=1), 4, axis=2).repeat(3, axis=3)


@pytest.mark.slow  # a torchvision ResNet-18 on the exact-NFK route, twice
def test_the_python_docs_run_as_written(tmp_path, monkeypatch):
    """docs/python.md's first two examples and its work-directory one, exec'd as written on small 32 x 32 x 3 sets
    (the reader's arrays), in a scratch working directory (they save a detector and a work directory there); a rotten
    example (a renamed method) fails (negative control)."""
    monkeypatch.chdir(tmp_path)
    examples = python_examples((ROOT / "docs/python.md").read_text())
    assert len(examples) >= 3
    train_images, train_labels = _digits(n=48)
    test_images, test_labels = _digits(n=24, offset=48)
    namespace = {"train_images": _cifar_shaped(train_images), "train_labels": train_labels,
                 "test_images": _cifar_shaped(test_images), "test_labels": test_labels,
                 "new_images": _cifar_shaped(_digits(classes=(7, 8, 9), n=12)[0])}
    exec(examples[0], namespace)
    first = namespace["scores"]
    assert set(first) == set(namespace["det"].rows_) and len(first["grad_knn"]) == 12
    assert namespace["flags"].dtype == bool and len(namespace["flags"]) == 12
    exec(examples[1], namespace)
    for row, s in namespace["scores"].items():  # the DataLoader fits and scores what the arrays did
        np.testing.assert_allclose(s, first[row], rtol=1e-6, err_msg=row)
    with pytest.raises(AttributeError, match="score_sample"):
        exec(examples[0].replace("score_samples", "score_sample"), dict(namespace))
    [work_dir_example] = [e for e in examples if "work_dir=" in e]
    exec(work_dir_example, namespace)  # the rows stream through a store; the second fit reads them back
    assert (tmp_path / "lowgrad-work/artifacts/extract/id_train.zarr").is_dir()
    again = namespace["knn_only"].score_samples(namespace["new_images"])
    assert set(again) == {"knn", "grad_knn"}
    for row, s in again.items():
        np.testing.assert_allclose(s, first[row], rtol=1e-6, err_msg=row)


@pytest.mark.slow  # the session's tiny finished run
def test_the_params_file_example_fits_what_the_run_fitted(tiny_finished, monkeypatch):
    from lowgrad.data import load_image_set

    monkeypatch.chdir(tiny_finished)
    prepared = {n: load_image_set(f"data/prepared/{n}.npz") for n in ("id_train", "id_test", "digits_7to9")}
    namespace = {"train_images": prepared["id_train"].images, "train_labels": prepared["id_train"].labels,
                 "test_images": prepared["id_test"].images, "test_labels": prepared["id_test"].labels}
    exec("from lowgrad import LowGrad\n" + python_examples((ROOT / "docs/python.md").read_text())[2], namespace)
    stored = np.load("artifacts/scores.npz")
    for row, s in namespace["det"].score_samples(prepared["digits_7to9"].images).items():
        ref = stored[f"{row}/digits_7to9"]
        np.testing.assert_allclose(s, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=row)


def test_every_input_form_fits_the_same_detector(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from lowgrad import LowGrad

    x, y = _digits(n=90)
    tx, ty = _digits(n=45, offset=90)
    new = _digits(classes=(7, 8, 9), n=20)[0]
    ref = LowGrad(_model(), **OPTIONS).fit(x, y, test=(tx, ty)).score_samples(new)
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    for folder, (images, labels) in (("train", (x, y)), ("test", (tx, ty))):
        for i, (img, label) in enumerate(zip(images, labels)):
            (tmp_path / folder / f"c{label}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[..., 0]).save(tmp_path / folder / f"c{label}" / f"{i:03d}.png")
    forms = {
        "tensors": ((torch.from_numpy(x), torch.from_numpy(y)), (torch.from_numpy(tx), torch.from_numpy(ty))),
        "Dataset": ((dataset, None), TensorDataset(torch.from_numpy(tx), torch.from_numpy(ty))),
        "DataLoader": ((DataLoader(dataset, batch_size=32), None), DataLoader(TensorDataset(torch.from_numpy(tx), torch.from_numpy(ty)), batch_size=7)),
        "folder": ((tmp_path / "train", None), tmp_path / "test"),
    }
    for form, ((images, labels), test) in forms.items():
        det = LowGrad(_model(), **{**OPTIONS, "data": {**OPTIONS["data"], "image_size": 8, "channels": 1}})
        scores = det.fit(images, labels, test=test).score_samples(new)
        for row, s in scores.items():  # a folder lists its images class by class: the same bank in another order
            tolerance = {"rtol": 1e-5, "atol": 1e-6} if form == "folder" else {"rtol": 0, "atol": 0}
            np.testing.assert_allclose(s, ref[row], **tolerance, err_msg=f"{form}: {row}")
    shuffled = LowGrad(_model(), **OPTIONS).fit(x, y[::-1].copy(), test=(tx, ty)).score_samples(new)
    assert not np.array_equal(shuffled["fused_knn_grad_knn"], ref["fused_knn_grad_knn"])  # negative control: labels matter


def test_misuse_is_one_line(tmp_path):
    from lowgrad import LowGrad

    x, y = _digits(n=90)
    tx, ty = _digits(n=45, offset=90)
    cases = [
        (ConfigError, "gradient.sketchh", lambda: LowGrad(_model(), **{**OPTIONS, "gradient": {"sketchh": "x"}}).fit(x, y, test=(tx, ty))),
        (ConfigError, "scoring.forward.knnn", lambda: LowGrad(_model(), **{**OPTIONS, "scoring": {"forward": {"knnn": {}}, "gradient": {}}}).fit(x, y, test=(tx, ty))),
        (DataError, "needs test=", lambda: LowGrad(_model(), **OPTIONS).fit(x, y)),
        (DataError, "every ID image needs its class label", lambda: LowGrad(_model(), **OPTIONS).fit(x, None, test=(tx, ty))),
        (DataError, "images must be uint8", lambda: LowGrad(_model(), **OPTIONS).fit(x.astype(np.float32), y, test=(tx, ty))),
        (DataError, "90 images but labels of shape (89,)", lambda: LowGrad(_model(), **OPTIONS).fit(x, y[:-1], test=(tx, ty))),
        (DataError, "the options say data.image_size = 16", lambda: LowGrad(_model(), **{**OPTIONS, "data": {**OPTIONS["data"], "image_size": 16}}).fit(x, y, test=(tx, ty))),
        (DetectorError, "not fitted yet", lambda: LowGrad(_model(), **OPTIONS).score_samples(tx)),
        (ConfigError, "needs a model", lambda: LowGrad(**OPTIONS).fit(x, y, test=(tx, ty))),
    ]
    for kind, fragment, call in cases:
        with pytest.raises(kind) as err:
            call()
        assert fragment in str(err.value) and "\n" not in str(err.value), (fragment, str(err.value))
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    LowGrad(model, **OPTIONS).fit(x, y, test=(tx, ty))
    assert type(model) is torch.nn.Sequential and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
