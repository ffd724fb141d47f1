"""Serving without silent wrong results (issue 38): one folder rule everywhere, every image decoded at its true
scale or refused in one line, and batches the monitor or ``lowgrad score`` cannot read named as given."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from lowgrad.config import DataConfig
from lowgrad.data import _FolderImages, _decode, folder_images, read_images
from lowgrad.errors import DataError
from tests.conftest import DIGITS


def _data(channels: int = 1, size: int = 4) -> DataConfig:
    return DataConfig(image_size=size, channels=channels, mean=[0.5] * channels, std=[0.5] * channels,
                      datasets={"id_train": {"source": "npz", "path": DIGITS}, "id_test": {"source": "npz", "path": DIGITS},
                                "ood": {"source": "npz", "path": DIGITS}})


def _png(path: Path, value: int = 100, size: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_images_at_the_top_beside_class_folders_are_refused_by_every_reader(tmp_path):
    mixed = tmp_path / "t"
    _png(mixed / "top.png"), _png(mixed / "cls_a/1.png"), _png(mixed / "cls_a/2.png")
    for read in (lambda: read_images(mixed, _data()), lambda: _FolderImages(mixed, 1), lambda: folder_images(mixed)):
        with pytest.raises(DataError) as err:
            read()
        assert "images at its top level (top.png) beside class sub-folders of images (cls_a)" in _one_line(err)
    # negative controls: a tree of class folders, and a flat folder, are each read whole
    tree = tmp_path / "tree"
    _png(tree / "cls_a/1.png", 10), _png(tree / "cls_a/2.png", 20), _png(tree / "cls_b/deeper/3.png", 30)
    _png(tree / ".hidden/4.png"), _png(tree / "cls_b/.x.png")
    files, labels = folder_images(tree)
    assert [str(f.relative_to(tree)) for f in files] == ["cls_a/1.png", "cls_a/2.png", "cls_b/deeper/3.png"]
    assert labels.tolist() == [0, 0, 1]
    images, names = read_images(tree, _data())
    assert names == ["cls_a/1.png", "cls_a/2.png", "cls_b/deeper/3.png"] and images[:, 0, 0, 0].tolist() == [10, 20, 30]
    flat = tmp_path / "flat"
    _png(flat / "a.png"), _png(flat / "b.png")
    assert folder_images(flat)[1] is None and len(read_images(flat, _data())[0]) == 2
    with pytest.raises(DataError, match="no class sub-folders: source image_folder reads root/<class>/<image>"):
        _FolderImages(flat, 1)


def test_a_folder_without_images_says_so(tmp_path):
    (tmp_path / "empty/sub").mkdir(parents=True)
    (tmp_path / "empty/notes.txt").write_text("x")
    with pytest.raises(DataError) as err:
        read_images(tmp_path / "empty", _data())
    assert "no images found" in _one_line(err) and "class sub-folders" not in str(err.value).split("(")[0]


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_sixteen_bit_and_float_images_keep_their_scale():
    grey16 = np.array([[0, 257, 51000, 65535]], np.uint16)
    data = _encoded(Image.fromarray(grey16), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    want = np.rint(grey16.astype(np.float64) * 255 / 65535).astype(np.uint8)  # 0, 1, 198, 255 (clipping gave 0, 255, 255, 255)
    np.testing.assert_array_equal(_decode(data, "g.png", 1)[..., 0], want)
    np.testing.assert_array_equal(_decode(data, "g.png", 3), np.repeat(want[..., None], 3, axis=2))
    floats = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    np.testing.assert_array_equal(_decode(_encoded(Image.fromarray(floats), "TIFF"), "f.tif", 1)[..., 0],
                                  [[0, 64, 128, 255]])
    # negative controls: floats outside [0, 1] and 32-bit integers have no known scale: refused, naming file and mode
    with pytest.raises(DataError) as err:
        _decode(_encoded(Image.fromarray(floats * 300), "TIFF"), "big.tif", 1)
    assert _one_line(err).startswith("big.tif: float pixels (mode F) from 0 to 300")
    with pytest.raises(DataError) as err:
        _decode(_encoded(Image.fromarray(np.array([[0, 70000]], np.int32)), "TIFF"), "i.tif", 1)
    assert _one_line(err).startswith("i.tif: 32-bit integer pixels (mode I)")


def test_eight_bit_modes_through_pillow_and_several_frames_refused():
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putdata([0, 1])
    np.testing.assert_array_equal(_decode(_encoded(palette, "PNG"), "p.png", 3)[0], [[10, 20, 30], [200, 100, 50]])
    cmyk = Image.frombytes("CMYK", (1, 1), bytes([40, 80, 120, 0]))  # no black: RGB = 255 - CMY
    np.testing.assert_array_equal(_decode(_encoded(cmyk, "TIFF"), "c.tif", 3)[0, 0], [215, 175, 135])
    rgba = Image.frombytes("RGBA", (1, 1), bytes([1, 2, 3, 0]))  # alpha dropped, colour kept as stored
    np.testing.assert_array_equal(_decode(_encoded(rgba, "PNG"), "a.png", 3)[0, 0], [1, 2, 3])
    la = Image.frombytes("LA", (1, 1), bytes([77, 9]))
    assert _decode(_encoded(la, "PNG"), "la.png", 1)[0, 0, 0] == 77
    bits = Image.frombytes("1", (8, 1), bytes([0b10100000]))
    assert _decode(_encoded(bits, "PNG"), "b.png", 1)[0, :3, 0].tolist() == [255, 0, 255]
    frames = [Image.new("L", (2, 2), v) for v in (0, 255)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(DataError) as err:
        _decode(gif.getvalue(), "anim.gif", 1)
    assert _one_line(err).startswith("anim.gif: 2 frames")


def test_a_channels_first_batch_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "batch.npz"
    np.savez(path, images=np.zeros((3, 1, 8, 8), np.uint8))
    with pytest.raises(DataError) as err:
        read_images(path, _data(size=8))
    assert _one_line(err) == (f"{path}: 'images' must be uint8 (N, H, W, C) with C 1 or 3, got uint8 (3, 1, 8, 8) "
                              "(channels first? store them as N x H x W x C)")


def test_check_refuses_a_model_over_the_exact_routes_limit_before_any_stage(tmp_path):
    from flows.pipeline import ROOT, check

    args = {"model.arch": "torchvision:resnet18", "data.channels": 3, "data.mean": [0.5] * 3, "data.std": [0.5] * 3}
    with pytest.raises(Exception) as err:
        check(str(ROOT / "params.yaml"), args, ROOT)
    assert "11,179,590 gradient parameters selected, more than gradient.max_params=2,000,000" in _one_line(err)
    # negative controls: the last layer alone fits; so does the whole model on a sketched route
    assert check(str(ROOT / "params.yaml"), {**args, "gradient.params": ["fc"]}, ROOT)[0].startswith("params ok")
    assert "(route: exact_nfk)" in check(str(ROOT / "params.yaml"), {**args, "gradient.sketch": "exact_nfk"}, ROOT)[0]


@pytest.mark.slow  # the session's tiny finished run (tests/conftest.py)
def test_api_errors_name_the_callers_input_and_large_batches_are_split(tiny_finished, monkeypatch):
    import torch

    from lowgrad import OODDetector
    from lowgrad.errors import DetectorError

    det = OODDetector.load(tiny_finished)
    size = det.params.data.image_size
    images = np.load(tiny_finished / "data/prepared/id_test.npz")["images"]
    plain = det.score(images, rows=["knn", "grad_knn"])
    as_tensor = det.score(torch.from_numpy(images[:5].copy()), rows=["knn", "grad_knn"])  # a plain tensor is taken
    np.testing.assert_array_equal(as_tensor["grad_knn"], det.score(images[:5], rows=["grad_knn"])["grad_knn"])
    assert set(det.score(images[:5], rows="knn")) == {"knn"}  # one row's name alone
    cases = [
        (images.astype(np.float32), f"got a ndarray of float32 {len(images)} x {size} x {size} x 1: pass raw 8-bit"),
        (torch.zeros(5, 1, size, size, dtype=torch.uint8),
         f"got a Tensor of uint8 5 x 1 x {size} x {size}: channels first: move the channel axis last"),
        (np.zeros((5, size + 1, size + 1, 1), np.uint8), f"got a ndarray of uint8 5 x {size + 1} x {size + 1} x 1: resize"),
        (None, "images must be an array, a tensor or a DataLoader of images, got None"),
    ]
    for given, fragment in cases:
        with pytest.raises(DataError) as err:
            det.score(given)
        assert fragment in _one_line(err)
    with pytest.raises(DetectorError) as err:
        det.predict(images, row=None)
    assert _one_line(err).startswith("predict needs one row's name, got None")
    # a DataLoader's one large batch is computed in the extract stage's chunks, as an array is
    seen = []
    features = det._scorer._features
    monkeypatch.setattr(det._scorer, "_features", lambda batch, *a: seen.append(len(batch)) or features(batch, *a))
    big = np.concatenate([images] * 5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(big)), batch_size=len(big))
    scores = det.score(loader, rows=["grad_knn"])["grad_knn"]
    chunk = det.params.gradient.chunk_rows
    assert max(seen) <= chunk < len(big) and sum(seen) == len(big)
    np.testing.assert_allclose(scores[: len(images)], plain["grad_knn"], rtol=1e-6)


@pytest.mark.slow
def test_lowgrad_score_refuses_a_folder_as_out_and_ctrl_c_is_one_line(tiny_finished, tmp_path, capsys, monkeypatch):
    from lowgrad import api, cli

    images = str(tiny_finished / "data/prepared/digits_7to9.npz")
    (tmp_path / "taken.csv").mkdir()
    called = []
    monkeypatch.setattr(api.OODDetector, "score", lambda *a, **k: called.append(1))
    with pytest.raises(SystemExit) as code:
        cli.main(["score", "--run", str(tiny_finished), "--images", images, "--out", str(tmp_path / "taken.csv")])
    err = capsys.readouterr().err
    assert code.value.code == 1 and err.count("\n") == 1 and "a folder of that name exists" in err and not called

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api.OODDetector, "score", interrupted)
    with pytest.raises(SystemExit) as code:
        cli.main(["score", "--run", str(tiny_finished), "--images", images, "--out", str(tmp_path / "s.csv")])
    err = capsys.readouterr().err
    assert code.value.code == 130 and err == "error: interrupted: nothing was written\n"
    assert not (tmp_path / "s.csv").exists()


def test_a_camera_mpo_jpeg_is_its_first_image_and_linked_class_folders_are_read(tmp_path):
    first, second = Image.new("RGB", (4, 4), (200, 10, 10)), Image.new("RGB", (4, 4), (10, 10, 200))
    buf = io.BytesIO()
    first.save(buf, format="MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 2
    pixel = _decode(buf.getvalue(), "photo.jpg", 3)[0, 0]
    assert pixel[0] > 150 and pixel[2] < 60  # the first (red) image, not the second (blue)
    # a class folder that is a link, and a linked folder inside a class folder, are read (torchvision's rule)
    elsewhere = tmp_path / "elsewhere"
    _png(elsewhere / "a.png", 50), _png(tmp_path / "other/b.png", 60)
    tree = tmp_path / "tree"
    _png(tree / "cls_a/1.png", 10)
    (tree / "cls_a/linked").symlink_to(elsewhere, target_is_directory=True)
    (tree / "cls_b").symlink_to(tmp_path / "other", target_is_directory=True)
    files, labels = folder_images(tree)
    assert [str(f.relative_to(tree)) for f in files] == ["cls_a/1.png", "cls_a/linked/a.png", "cls_b/b.png"]
    assert labels.tolist() == [0, 0, 1]


def _sigint_default() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kept_outputs(root: Path) -> dict[str, bytes]:
    """score's and report's outputs, as bytes (the detector's two files stand for its folder)."""
    from lowgrad.paths import METRICS, REPORT, SCORES
    from lowgrad.paths import DETECTOR_ARRAYS as ARRAYS, DETECTOR_META as META

    return {rel: (root / rel).read_bytes() for rel in (SCORES, ARRAYS, META, METRICS, REPORT)}


@pytest.mark.slow  # a copy of the session's tiny finished run, two interrupted reruns of score and a whole one
def test_an_interrupted_rerun_of_score_keeps_the_previous_detector_scores_and_metrics(tiny_project):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it), then SIGKILL, while ``score`` reruns for a new
    option: after each the previous detector, scores, metrics and report are all still there, byte for byte, and
    the previous detector scores as the run did; the next ``dvc repro`` completes with the new option."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from lowgrad import OODDetector
    from lowgrad.data import load_image_set
    from tests.test_pipeline import _env, dvc, set_param

    root = tiny_project
    before = _kept_outputs(root)
    set_param(root, "scoring.forward.knn.k", 3)
    replicates = yaml.safe_load((root / "params.yaml").read_text())["scoring"]["bootstrap"]["replicates"]
    set_param(root, "scoring.bootstrap.replicates", 50_000)  # a long score: the kill lands inside it, however slow
    staging = root / "artifacts"  # the machine (the staging folder appears before the rows are fitted)
    stored = np.load(root / "artifacts/scores.npz")
    images = load_image_set(root / "data/prepared/digits_7to9.npz").images
    for signal_name in ("SIGINT", "SIGKILL"):
        proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "score"], cwd=root, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_sigint_default)  # a pytest-xdist worker ignores SIGINT: its children
        # would inherit that, and a Ctrl-C would never reach the stage
        deadline = time.monotonic() + 600
        while not any(staging.glob(".detector.new-*")):
            assert proc.poll() is None, proc.stdout.read().decode()  # score is fitting: DVC would have removed
            assert time.monotonic() < deadline, "score never started"  # the outputs by now
            time.sleep(0.05)
        os.killpg(proc.pid, getattr(signal, signal_name))
        proc.wait(timeout=120)
        assert proc.returncode != 0
        if signal_name == "SIGINT":  # the stage cleaned up after itself
            assert not any(staging.glob(".detector.new-*")) and not list(staging.glob("scores.tmp*"))
        assert _kept_outputs(root) == before, signal_name
        scores = OODDetector.load(root).score(images, rows=["knn", "grad_knn"])
        for row, s in scores.items():
            np.testing.assert_allclose(s, stored[f"{row}/digits_7to9"], rtol=1e-4, atol=1e-6, err_msg=row)
    set_param(root, "scoring.bootstrap.replicates", replicates)
    dvc(root, "repro")
    after = _kept_outputs(root)
    assert after["report/metrics.json"] != before["report/metrics.json"]  # negative control: the rerun did replace them
    assert json.loads(after["artifacts/detector/detector.json"])["params"]["scoring"]["forward"]["knn"]["k"] == 3
    assert not any(staging.glob(".detector.new-*"))  # the killed run's staging folder is removed by the next run
