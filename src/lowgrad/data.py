"""Image sources -> uint8 arrays ``(N, H, W, C)`` with int64 labels (-1 where unlabelled).

Sources: scikit-learn's bundled digits and photos (the embedded default, nothing downloaded), the
``.npz`` layouts of ``../shared`` (decoded and JPEG-encoded) and an ImageFolder tree.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split

from lowgrad.config import DataConfig, DatasetConfig
from lowgrad.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,), -1 = no label

    def __len__(self) -> int:
        return len(self.labels)


def _digits() -> ImageSet:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return ImageSet(images, bunch.target.astype(np.int64))


def _photo_patches(n: int, size: int, channels: int, rng: np.random.Generator) -> ImageSet:
    """Random square patches of scikit-learn's two bundled photos, each resized to ``size``."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    patch = 4 * size
    out = np.empty((n, size, size, channels), dtype=np.uint8)
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        top = rng.integers(photo.shape[0] - patch + 1)
        left = rng.integers(photo.shape[1] - patch + 1)
        crop = Image.fromarray(photo[top : top + patch, left : left + patch])
        crop = crop.resize((size, size), Image.BILINEAR, reducing_gap=2.0).convert("L" if channels == 1 else "RGB")
        out[i] = np.asarray(crop).reshape(size, size, channels)
    return ImageSet(out, np.full(n, -1, dtype=np.int64))


def _open_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DataError(f"{path}: missing arrays {missing} (found {npz.files})")
            return {k: npz[k] for k in keys}
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None


def _decode(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"corrupt image {where}: {err}") from None


def _npz_decoded(path: Path) -> ImageSet:
    arrays = _open_npz(path, ("images", "labels"))
    images = arrays["images"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"{path}: 'images' must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    return ImageSet(images, arrays["labels"].astype(np.int64))


class _JpegImages:
    """Sequence view of the encoded ``.npz`` layout: an image is decoded only when indexed, so sub-sampling
    50,000 images to 5,000 decodes 5,000."""

    def __init__(self, path: Path) -> None:
        arrays = _open_npz(path, ("jpeg", "offsets", "labels"))
        self.path, self.blob, self.offsets = path, arrays["jpeg"], arrays["offsets"]
        self.labels = arrays["labels"].astype(np.int64)
        if len(self.offsets) != len(self.labels) + 1:
            raise DataError(f"{path}: 'offsets' must have N+1 entries for N labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> np.ndarray:
        return _decode(self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes(), f"{i} in {self.path}")


def _image_folder(root: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """``root/<class>/<image>``: classes in sorted order get labels 0..C-1 (torchvision's rule)."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root}: no class sub-folders")
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                images.append(_decode(file.read_bytes(), str(file)))
                labels.append(label)
    if not images:
        raise DataError(f"{root}: no images found")
    return images, np.asarray(labels, dtype=np.int64)


def resize_center_crop(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Resize the short side to ``size`` (bilinear, antialiased), centre-crop, convert channels."""
    img = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size)).convert("L" if channels == 1 else "RGB")
    arr = np.asarray(img)
    return arr[..., None] if channels == 1 else arr


def _conform(images: list[np.ndarray] | np.ndarray, name: str, spec: DatasetConfig, data: DataConfig) -> np.ndarray:
    expected = (data.image_size, data.image_size, data.channels)
    if spec.resize:
        return np.stack([resize_center_crop(im, data.image_size, data.channels) for im in images])
    shapes = {tuple(im.shape) for im in images}
    if shapes != {expected}:
        found = ", ".join("x".join(map(str, s)) for s in sorted(shapes)[:3])
        raise DataError(
            f"dataset '{name}': images are {found} but data.image_size/channels expect "
            f"{'x'.join(map(str, expected))}; set data.datasets.{name}.resize: true to resize + centre-crop"
        )
    return np.stack(images) if isinstance(images, list) else images


def _subsample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a random subset of size ``n``, stratified by label when labels exist."""
    if n >= len(labels):
        return np.arange(len(labels))
    stratify = labels if (labels >= 0).all() and len(np.unique(labels)) > 1 else None
    idx, _ = train_test_split(np.arange(len(labels)), train_size=n, random_state=seed, stratify=stratify)
    return np.sort(idx)


def load_dataset(name: str, data: DataConfig, seed: int) -> ImageSet:
    """Load, filter, split and subsample one configured dataset into the configured image shape."""
    spec = data.datasets[name]
    rng = np.random.default_rng(seed)
    if spec.source == "sklearn_digits":
        raw = _digits()
        images, labels = list(raw.images), raw.labels
    elif spec.source == "sklearn_photos":
        raw = _photo_patches(spec.n, data.image_size, data.channels, rng)
        images, labels = list(raw.images), raw.labels
    elif spec.source == "npz":
        raw = _npz_decoded(Path(spec.path))
        images, labels = raw.images, raw.labels
    elif spec.source == "npz_jpeg":
        images = _JpegImages(Path(spec.path))
        labels = images.labels
    else:
        images, labels = _image_folder(Path(spec.path))

    keep = np.arange(len(labels))
    if spec.classes is not None:
        keep = np.flatnonzero(np.isin(labels, spec.classes))
        if len(keep) == 0:
            raise DataError(f"dataset '{name}': no images of classes {spec.classes}")
    if spec.split != "all":
        train_idx, test_idx = train_test_split(
            keep, test_size=spec.test_fraction, random_state=seed, stratify=labels[keep]
        )
        keep = np.sort(train_idx if spec.split == "train" else test_idx)
    if spec.max_samples is not None:
        keep = keep[_subsample(labels[keep], spec.max_samples, seed)]

    selected = [images[i] for i in keep]
    array = _conform(selected, name, spec, data)
    log.info("dataset %s: %d images of shape %s from %s", name, len(keep), array.shape[1:], spec.source)
    return ImageSet(np.ascontiguousarray(array, dtype=np.uint8), labels[keep].astype(np.int64))


def save_image_set(path: str | Path, image_set: ImageSet) -> None:
    """Write atomically (temporary file, then rename): a killed run leaves no half-written set."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=image_set.images, labels=image_set.labels)
    tmp.replace(path)


def load_image_set(path: str | Path) -> ImageSet:
    arrays = _open_npz(Path(path), ("images", "labels"))
    return ImageSet(arrays["images"], arrays["labels"])


def to_tensor_batch(images: np.ndarray, mean: list[float], std: list[float]):
    """uint8 ``(B, H, W, C)`` -> normalised float32 ``(B, C, H, W)`` torch tensor (``x/255`` then Normalize)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s
