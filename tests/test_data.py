"""Data sources: embedded sets, npz layouts, ImageFolder, shape checks and corrupt input."""

from __future__ import annotations

import io

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowgrad.config import DataConfig
from lowgrad.data import load_dataset, resize_center_crop, to_tensor_batch
from lowgrad.errors import DataError

from tests.conftest import DIGITS, PHOTOS, shared_file


def _data(datasets: dict, size: int = 8, channels: int = 1) -> DataConfig:
    base = {"id_train": {"source": "npz", "path": DIGITS}, "id_test": {"source": "npz", "path": DIGITS}, "o": {"source": "npz", "path": DIGITS}}
    base.update(datasets)
    return DataConfig(image_size=size, channels=channels, mean=[0.5] * channels, std=[0.5] * channels, datasets=base)


def _jpeg_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_digits_split_is_stratified_disjoint_and_complete():
    cfg = _data({
        "id_train": {"source": "npz", "path": DIGITS, "classes": [0, 1, 2], "split": "train", "test_fraction": 0.3},
        "id_test": {"source": "npz", "path": DIGITS, "classes": [0, 1, 2], "split": "test", "test_fraction": 0.3},
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
    cfg = _data({"o": {"source": "npz", "path": DIGITS, "max_samples": 100}})
    sub = load_dataset("o", cfg, 0)
    assert len(sub) == 100 and len(np.unique(sub.labels)) == 10


def test_photo_patches_shape_and_channels():
    cfg = _data({"o": {"source": "photo_patches", "path": PHOTOS, "n": 20}}, size=16, channels=3)
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


def test_image_folder_decodes_only_the_sample(tmp_path, monkeypatch):
    """A large tree sub-sampled to a few images opens only those files (ImageNet-sized folders)."""
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(20):
            Image.fromarray(np.full((9, 9, 3), i, np.uint8)).save(tmp_path / cls / f"{i:02d}.png")
    opened = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: opened.append(self) or real(self))
    cfg = _data({"o": {"source": "image_folder", "path": str(tmp_path), "max_samples": 4}}, size=9, channels=3)
    loaded = load_dataset("o", cfg, 0)
    assert len(loaded) == 4 and len(opened) == 4 and sorted(np.bincount(loaded.labels)) == [2, 2]


def test_resize_short_side_then_centre_crop():
    """ImageNet's evaluation transform: short side to 256, centre crop 224 (data.resize_short_side)."""
    img = np.zeros((300, 400, 3), np.uint8)
    img[150 - 100 : 150 + 100, 200 - 100 : 200 + 100] = 255  # a centred white 200 x 200 square
    out = resize_center_crop(img, 224, 3, short_side=256)
    assert out.shape == (224, 224, 3)
    # the square becomes 200 * 256/300 = 171 px wide, centred: white in the middle, black at the crop's border
    assert out[112, 112].min() > 250 and out[0, 0].max() < 5 and out[112, 20].max() < 5


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The MNIST idx layout: magic (0x08 = uint8, ndim), big-endian sizes, raw bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_source_reads_a_local_copy_and_never_downloads_by_default(tmp_path):
    """A torchvision dataset class on files already on disk (FashionMNIST's raw idx files, written here from
    scikit-learn's digits); a missing copy is a clear error that names the way out, with no network access."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.kron(digits.images[:30] * 255 / 16, np.ones((3, 3)))  # 24 x 24
    images = np.pad(images, ((0, 0), (2, 2), (2, 2))).astype(np.uint8)  # 28 x 28, as the real files
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "t10k-images-idx3-ubyte", images)
    _write_idx(raw / "t10k-labels-idx1-ubyte", digits.target[:30])
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"")  # present but unused (torchvision checks that all four exist)
    spec = {"source": "torchvision", "dataset": "FashionMNIST", "path": str(tmp_path), "subset": "test", "resize": True}
    loaded = load_dataset("o", _data({"o": spec}, size=8, channels=1), 0)
    assert loaded.images.shape == (30, 8, 8, 1)
    np.testing.assert_array_equal(loaded.labels, digits.target[:30])
    expected = resize_center_crop(np.repeat(images[3][..., None], 3, axis=2), 8, 1)
    np.testing.assert_array_equal(loaded.images[3], expected)

    missing = {**spec, "path": str(tmp_path / "nowhere")}
    with pytest.raises(DataError, match=r"torchvision FashionMNIST not found under .*nowhere \(download is off"):
        load_dataset("o", _data({"o": missing}, size=8, channels=1), 0)
    with pytest.raises(DataError, match="no dataset class 'NotADataset'"):
        load_dataset("o", _data({"o": {**spec, "dataset": "NotADataset"}}, size=8, channels=1), 0)


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
