"""Data sources: embedded sets, npz layouts, ImageFolder, shape checks and corrupt input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lowgrad.config import DataConfig
from lowgrad.data import load_dataset, resize_center_crop, to_tensor_batch
from lowgrad.errors import DataError

from tests.conftest import shared_file


def _data(datasets: dict, size: int = 8, channels: int = 1) -> DataConfig:
    base = {"id_train": {"source": "sklearn_digits"}, "id_test": {"source": "sklearn_digits"}, "o": {"source": "sklearn_digits"}}
    base.update(datasets)
    return DataConfig(image_size=size, channels=channels, mean=[0.5] * channels, std=[0.5] * channels, datasets=base)


def _jpeg_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_digits_split_is_stratified_disjoint_and_complete():
    cfg = _data({
        "id_train": {"source": "sklearn_digits", "classes": [0, 1, 2], "split": "train", "test_fraction": 0.3},
        "id_test": {"source": "sklearn_digits", "classes": [0, 1, 2], "split": "test", "test_fraction": 0.3},
    })
    train, test = load_dataset("id_train", cfg, 0), load_dataset("id_test", cfg, 0)
    assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
    assert set(np.unique(train.labels)) == {0, 1, 2}
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.isin(digits.target, [0, 1, 2])
    full = sorted(np.rint(im * 255 / 16).astype(np.uint8).tobytes() for im in digits.images[keep])
    both = sorted(im.tobytes() for im in np.concatenate([train.images, test.images]))
    assert both == full, "train and test must partition the selected classes exactly"
    assert abs(len(test) - 0.3 * keep.sum()) <= 1
    counts = np.bincount(test.labels)
    assert counts.max() - counts.min() <= 2  # stratified


def test_max_samples_subsample_is_random_not_a_slice():
    cfg = _data({"o": {"source": "sklearn_digits", "max_samples": 100}})
    sub = load_dataset("o", cfg, 0)
    assert len(sub) == 100 and len(np.unique(sub.labels)) == 10


def test_photo_patches_shape_and_channels():
    cfg = _data({"o": {"source": "sklearn_photos", "n": 20}}, size=16, channels=3)
    patches = load_dataset("o", cfg, 0)
    assert patches.images.shape == (20, 16, 16, 3) and (patches.labels == -1).all()


def test_wrong_shape_is_a_clear_error_and_resize_fixes_it(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "big.npz"
    np.savez(path, images=rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), labels=np.zeros(5, np.int64))
    cfg = _data({"o": {"source": "npz", "path": str(path)}})
    with pytest.raises(DataError, match=r"images are 32x32x3 but .* expect 8x8x1; set data.datasets.o.resize"):
        load_dataset("o", cfg, 0)
    cfg = _data({"o": {"source": "npz", "path": str(path), "resize": True}})
    assert load_dataset("o", cfg, 0).images.shape == (5, 8, 8, 1)


def test_npz_jpeg_layout_and_corrupt_image(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    blobs = [_jpeg_bytes(im) for im in images]
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    path = tmp_path / "set_jpeg.npz"
    np.savez(path, jpeg=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets, labels=np.arange(4))
    cfg = _data({"o": {"source": "npz_jpeg", "path": str(path)}}, channels=3)
    loaded = load_dataset("o", cfg, 0)
    expected = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    np.testing.assert_array_equal(loaded.images, expected)
    blobs[2] = b"not a jpeg at all"
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    np.savez(path, jpeg=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets, labels=np.arange(4))
    with pytest.raises(DataError, match="corrupt image 2 in"):
        load_dataset("o", cfg, 0)


def test_missing_file_and_wrong_layout(tmp_path):
    cfg = _data({"o": {"source": "npz", "path": str(tmp_path / "missing.npz")}})
    with pytest.raises(DataError, match="dataset file not found"):
        load_dataset("o", cfg, 0)
    np.savez(tmp_path / "x.npz", pixels=np.zeros(3))
    cfg = _data({"o": {"source": "npz", "path": str(tmp_path / "x.npz")}})
    with pytest.raises(DataError, match=r"missing arrays \['images', 'labels'\]"):
        load_dataset("o", cfg, 0)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(2)
    for cls in ("cat", "ant"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    cfg = _data({"o": {"source": "image_folder", "path": str(tmp_path), "resize": True}}, size=8, channels=3)
    loaded = load_dataset("o", cfg, 0)
    assert loaded.images.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(loaded.labels, [0, 0, 0, 1, 1, 1])  # 'ant' < 'cat'


def test_resize_center_crop_and_normalisation():
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, 5:15] = 255  # the centre square is white
    out = resize_center_crop(img, 4, 3)
    assert out.shape == (4, 4, 3) and out.min() > 200
    x = to_tensor_batch(np.full((2, 4, 4, 1), 255, np.uint8), [0.5], [0.25])
    assert x.shape == (2, 1, 4, 4) and float(x[0, 0, 0, 0]) == pytest.approx(2.0)


def test_shared_cifar_jpeg_decodes():
    path = shared_file("data/cifar10_test_jpeg.npz")
    cfg = _data({"o": {"source": "npz_jpeg", "path": str(path), "max_samples": 200}}, size=32, channels=3)
    loaded = load_dataset("o", cfg, 0)
    assert loaded.images.shape == (200, 32, 32, 3) and len(np.unique(loaded.labels)) == 10
