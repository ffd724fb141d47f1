"""A user's own files, as they come: each rough edge is one clear line, and what is valid loads exactly.

Every refusal here has a negative control: the same file, made right, loads (and loads the same numbers)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from lowgrad.config import DataConfig, ModelConfig
from lowgrad.data import load_dataset
from lowgrad.errors import CheckpointError, DataError
from lowgrad.checkpoints import load_checkpoint
from lowgrad.models import build_model

from tests.conftest import DIGITS


def _model() -> torch.nn.Module:
    return build_model("small_cnn", 6, 1)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "\x1b" not in text, text
    return text


def test_a_state_dict_loads_exactly(tmp_path):
    """The control for every refusal below: a plain state_dict round-trips bit for bit."""
    saved = _model()
    torch.save(saved.state_dict(), tmp_path / "ok.pt")
    loaded = load_checkpoint(_model(), tmp_path / "ok.pt")
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_pickled_module_names_its_class_and_the_fix(tmp_path):
    torch.save(_model(), tmp_path / "whole.pt")  # torch.save(model): the commonest way to save a model
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_model(), tmp_path / "whole.pt")
    line = _one_line(err)
    assert "pickled Python object" in line and "lowgrad.networks.SmallCNN" in line
    assert "torch.save(model.state_dict(), path)" in line


@pytest.mark.parametrize("content, says", [
    (b"", "empty file (0 bytes)"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n", "not a torch checkpoint (it starts with b'vers'"),
    (b"\x00\x01garbage", "not a torch checkpoint"),
])
def test_files_that_are_not_checkpoints(tmp_path, content, says):
    (tmp_path / "ckpt.pt").write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_model(), tmp_path / "ckpt.pt")
    assert says in _one_line(err)


def test_a_directory_and_a_truncated_zip(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_model(), tmp_path / "run")
    assert "is a directory" in _one_line(err)
    torch.save(_model().state_dict(), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])  # a copy interrupted half-way
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_model(), tmp_path / "cut.pt")
    assert "cannot be loaded with weights_only=True" in _one_line(err)


def test_a_dict_of_other_things_says_what_it_found(tmp_path):
    torch.save([t for t in _model().state_dict().values()], tmp_path / "list.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_model(), tmp_path / "list.pt")
    assert "found a list" in _one_line(err)


def test_integer_or_bool_weights_are_refused_not_cast(tmp_path):
    state = _model().state_dict()
    for wrong in (torch.int64, torch.bool):
        bad = {k: (v.to(wrong) if k == "head.weight" else v) for k, v in state.items()}
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(_model(), tmp_path / "bad.pt")
        assert f"'head.weight' is {wrong}" in _one_line(err)


def test_a_float64_checkpoint_loads_as_float32_and_says_so(tmp_path, caplog):
    state = _model().state_dict()
    torch.save({k: v.double() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "f64.pt")
    with caplog.at_level(logging.INFO, logger="lowgrad.checkpoints"):
        loaded = load_checkpoint(_model(), tmp_path / "f64.pt")
    assert "torch.float64 tensors loaded as torch.float32" in caplog.text
    for key, value in state.items():
        assert loaded.state_dict()[key].dtype == value.dtype and torch.equal(loaded.state_dict()[key], value)


@pytest.mark.parametrize("checkpoint, says", [
    ("", "model.checkpoint is empty"),
    ("   ", "model.checkpoint is empty"),
    ("https://example.org/resnet18.pth", "is a URL: nothing is fetched at run time"),
    ("s3://bucket/model.pt", "is a URL"),
])
def test_checkpoint_setting_that_names_no_local_file(checkpoint, says):
    with pytest.raises(ValidationError, match=says):
        ModelConfig(arch="small_cnn", num_classes=6, checkpoint=checkpoint)
    ModelConfig(arch="small_cnn", num_classes=6, checkpoint="checkpoints/latest.pt")  # control


def _folder_config(path, channels: int, **spec) -> DataConfig:
    datasets = {"id_train": {"source": "npz", "path": DIGITS}, "id_test": {"source": "npz", "path": DIGITS},
                "o": {"source": "image_folder", "path": str(path), **spec}}
    return DataConfig(image_size=8, channels=channels, mean=[0.5] * channels, std=[0.5] * channels, datasets=datasets)


def _folder(root, mode: str, size=(8, 8), per_class: int = 2, seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    made: dict[str, list[np.ndarray]] = {}
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        shape = size + ((3,) if mode == "RGB" else ())
        made[cls] = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(per_class)]
        for i, pixels in enumerate(made[cls]):
            Image.fromarray(pixels, mode).save(root / cls / f"{i}.png")
    return made


def test_a_greyscale_folder_with_one_channel_keeps_its_pixels(tmp_path):
    made = _folder(tmp_path, "L")
    loaded = load_dataset("o", _folder_config(tmp_path, channels=1), 0)
    assert loaded.images.shape == (4, 8, 8, 1)
    np.testing.assert_array_equal(loaded.images[..., 0], np.stack(made["a"] + made["b"]))  # PNG is lossless
    rgb = load_dataset("o", _folder_config(tmp_path, channels=3), 0)  # control: the same files as RGB
    assert rgb.images.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(rgb.images[..., 1], loaded.images[..., 0])


def test_colour_images_into_one_channel_use_pillows_luma(tmp_path):
    made = _folder(tmp_path, "RGB")
    loaded = load_dataset("o", _folder_config(tmp_path, channels=1), 0)
    expected = [np.asarray(Image.fromarray(p).convert("L")) for p in made["a"] + made["b"]]
    np.testing.assert_array_equal(loaded.images[..., 0], np.stack(expected))
    resized = load_dataset("o", _folder_config(tmp_path, channels=1, resize=True), 0)  # the resize path agrees
    np.testing.assert_array_equal(resized.images, loaded.images)


def test_a_zero_byte_image_names_the_file(tmp_path):
    _folder(tmp_path, "RGB")
    (tmp_path / "b" / "9.png").write_bytes(b"")
    with pytest.raises(DataError) as err:
        load_dataset("o", _folder_config(tmp_path, channels=3), 0)
    line = _one_line(err)
    assert str(tmp_path / "b" / "9.png") in line and "empty file (0 bytes)" in line and "BytesIO" not in line
    (tmp_path / "b" / "9.png").write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError) as err:
        load_dataset("o", _folder_config(tmp_path, channels=3), 0)
    assert "not an image format Pillow can read" in _one_line(err) and "BytesIO" not in str(err.value)


def test_an_empty_class_folder_is_named(tmp_path):
    _folder(tmp_path, "RGB")
    (tmp_path / "c_empty").mkdir()
    (tmp_path / "c_empty" / "notes.txt").write_text("todo")
    with pytest.raises(DataError) as err:
        load_dataset("o", _folder_config(tmp_path, channels=3), 0)
    assert "class folder(s) c_empty hold no images" in _one_line(err)
    (tmp_path / "c_empty" / "notes.txt").unlink()
    (tmp_path / "c_empty").rmdir()
    assert len(load_dataset("o", _folder_config(tmp_path, channels=3), 0)) == 4  # control
