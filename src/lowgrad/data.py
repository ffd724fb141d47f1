"""Image sources -> uint8 arrays ``(N, H, W, C)`` with int64 labels (-1 where unlabelled).

Every source reads ``path`` (which ``prepare@<set>`` lists as a DVC dependency): the ``.npz`` layouts of
``../shared`` (decoded and JPEG-encoded), an ImageFolder tree, random patches of the photos in a folder (the
embedded default's OOD photos, ``data/embedded/photos``) and any ``torchvision.datasets`` class (``download`` off
unless asked). File-backed sources decode an image only when it is selected, so sub-sampling a large set
decodes the sample only.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lowgrad.config import DataConfig, DatasetConfig, InputConfig
from lowgrad.errors import DataError
from lowgrad.paths import atomic_path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp"}


def check_class_labels(labels: np.ndarray, num_classes: int, what: str, unlabelled_ok: bool = False) -> None:
    """Refuse labels outside the model's classes ``0..num_classes - 1`` (``-1``, no label, allowed where
    ``unlabelled_ok``): one :class:`DataError` line naming how many and the first."""
    wrong = labels[(labels < (-1 if unlabelled_ok else 0)) | (labels >= num_classes)]
    if len(wrong):
        raise DataError(f"{what}: {len(wrong)} outside the model's {num_classes} classes (0..{num_classes - 1}), "
                        f"first {wrong[0]}")


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,), -1 = no label

    def __len__(self) -> int:
        return len(self.labels)


def _photos(root: Path) -> list[np.ndarray]:
    """The RGB photos of a folder, in sorted file order."""
    if not root.is_dir():
        raise DataError(f"photo folder not found: {root}")
    files = sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{root}: no photos found (suffixes {sorted(IMAGE_SUFFIXES)})")
    return [_decode(f.read_bytes(), str(f), channels=3) for f in files]  # converted per patch, after resizing


def _photo_patches(photos: list[np.ndarray], n: int, size: int, channels: int, rng: np.random.Generator) -> ImageSet:
    """``n`` random square patches (side ``4 * size``) of the photos, each resized to ``size``."""
    patch = 4 * size
    small = [f"{p.shape[1]}x{p.shape[0]}" for p in photos if min(p.shape[:2]) < patch]
    if small:
        raise DataError(f"photo_patches: photos of {', '.join(small)} are smaller than a {patch}x{patch} patch")
    out = np.empty((n, size, size, channels), dtype=np.uint8)
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        top = rng.integers(photo.shape[0] - patch + 1)
        left = rng.integers(photo.shape[1] - patch + 1)
        crop = Image.fromarray(photo[top : top + patch, left : left + patch])
        out[i] = _as_channels(crop.resize((size, size), Image.BILINEAR, reducing_gap=2.0), channels)
    return ImageSet(out, np.full(n, -1, dtype=np.int64))


def _open_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy array (or pickle-free other format)
            raise DataError(f"{path}: a single .npy array, not an .npz archive with arrays {list(keys)}; "
                            "save it with numpy.savez(path, images=..., labels=...)")
        with loaded as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DataError(f"{path}: missing arrays {missing} (found {npz.files})")
            return {k: npz[k] for k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz file, truncated or corrupt ({err}); copy it again") from None


def checked_labels(labels: np.ndarray, n_images: int, where: str) -> np.ndarray:
    """Labels as int64 (N,), refused (never repaired) when they do not fit the images: a count mismatch,
    more than one dimension, or non-integer values."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"{where}: 'labels' must be 1-D (one integer per image), got shape {labels.shape}")
    if len(labels) != n_images:
        raise DataError(f"{where}: {n_images} images but {len(labels)} labels; each image needs exactly one label")
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
            bad = labels[~np.isfinite(labels) | (labels != np.round(labels))][0]
            raise DataError(f"{where}: labels must be integers, found {bad.item()!r}")
    elif labels.dtype.kind not in "iub":
        raise DataError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    return labels.astype(np.int64)


def _as_channels(img: Image.Image, channels: int, where: str = "an image") -> np.ndarray:
    """``img`` as uint8 (H, W, channels), greyscale when ``channels`` is 1, else RGB, at its true scale: 8-bit modes
    (1, L, P, LA, RGB, RGBA, CMYK, YCbCr, ...) through Pillow's conversion (a palette expanded, alpha dropped),
    16-bit greyscale by its full range (``v * 255 / 65535``), float greyscale in [0, 1] as ``v * 255``. 32-bit
    integer pixels, floats outside [0, 1] and files of several frames (animations, multi-page files; a camera's
    MPO JPEG is read as its first image) have no one scale or image: each is a :class:`DataError` naming the file
    and its mode."""
    frames = getattr(img, "n_frames", 1)
    if frames > 1 and img.format != "MPO":  # a camera's MPO JPEG: its first image is the photo (what viewers show)
        raise DataError(f"{where}: {frames} frames (an animation or a multi-page file, mode {img.mode}): give one "
                        "image per file")
    if img.mode.startswith("I;16"):
        grey = np.rint(np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not np.isfinite(values).all() or low < 0.0 or high > 1.0:
            raise DataError(f"{where}: float pixels (mode F) from {low:g} to {high:g}: only [0, 1] has a known scale; "
                            "save it as 8- or 16-bit, or as floats in [0, 1]")
        grey = np.rint(values * 255.0).astype(np.uint8)
    elif img.mode in ("I", "I;32", "I;32B", "I;32L"):
        raise DataError(f"{where}: 32-bit integer pixels (mode {img.mode}) have no known scale: save it as 8- or 16-bit")
    else:
        arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
        return arr[..., None] if channels == 1 else arr
    return grey[..., None] if channels == 1 else np.repeat(grey[..., None], 3, axis=2)


def _decode(data: bytes, where: str, channels: int) -> np.ndarray:
    if not data:
        raise DataError(f"corrupt image {where}: an empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return _as_channels(img, channels, where)
    except UnidentifiedImageError:
        raise DataError(f"corrupt image {where}: not an image format Pillow can read") from None
    except OSError as err:
        raise DataError(f"corrupt image {where}: {err}") from None


def _npz_decoded(path: Path) -> ImageSet:
    arrays = _open_npz(path, ("images", "labels"))
    images = arrays["images"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"{path}: 'images' must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    return ImageSet(images, checked_labels(arrays["labels"], len(images), str(path)))


class _JpegImages:
    """Sequence view of the encoded ``.npz`` layout: an image is decoded only when indexed, so sub-sampling
    50,000 images to 5,000 decodes 5,000."""

    def __init__(self, path: Path, channels: int) -> None:
        arrays = _open_npz(path, ("jpeg", "offsets", "labels"))
        self.path, self.blob, self.offsets, self.channels = path, arrays["jpeg"], arrays["offsets"], channels
        if self.offsets.ndim != 1 or len(self.offsets) < 1:
            raise DataError(f"{path}: 'offsets' must be 1-D with N+1 entries for N images")
        self.labels = checked_labels(arrays["labels"], len(self.offsets) - 1, str(path))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> np.ndarray:
        return _decode(self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes(), f"{i} in {self.path}", self.channels)


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    """The image files in ``folder`` (and below it when ``recursive``), sorted, hidden entries (``.name``) left out."""
    if recursive:  # followlinks: linked sub-folders are read, as torchvision's ImageFolder reads them
        found = [Path(top) / name for top, _, names in os.walk(folder, followlinks=True) for name in names]
    else:
        found = list(folder.iterdir())
    return sorted(f for f in found if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def folder_images(root: Path) -> tuple[list[Path], np.ndarray | None]:
    """The one rule for every folder lowgrad reads (prepare's ``image_folder``, ``lowgrad score``, the monitor):
    a folder holds either images at its top level (one unlabelled set: labels None) or class sub-folders of images,
    an ImageFolder tree (torchvision's rule: classes in sorted order are labels 0..C-1, each class's images found
    anywhere below its folder). Both at once, a class folder without images and a folder without any are each one
    :class:`DataError`; nothing is dropped without a word. Hidden entries (``.name``) are not images."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    top = _images_in(root, recursive=False)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = {name: _images_in(root / name, recursive=True) for name in classes}
    holding = [name for name, files in per_class.items() if files]
    if top and holding:
        raise DataError(f"{root}: images at its top level ({', '.join(f.name for f in top[:3])}{', ...' if len(top) > 3 else ''}) "
                        f"beside class sub-folders of images ({', '.join(holding[:3])}{', ...' if len(holding) > 3 else ''}): "
                        "a folder is one set of images or a tree of class folders, not both; move the top-level images "
                        "into a sub-folder of their own")
    if top:
        return top, None
    if not holding:
        raise DataError(f"{root}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, at its top level "
                        "and in class sub-folders)")
    empty = [name for name in classes if not per_class[name]]
    if empty:
        raise DataError(f"{root}: class folder(s) {', '.join(empty)} hold no images; every class sub-folder is a "
                        "label (sorted order), so remove the empty ones or add their images")
    files = [f for name in classes for f in per_class[name]]
    labels = np.concatenate([np.full(len(per_class[name]), label, np.int64) for label, name in enumerate(classes)])
    return files, labels


class _FolderImages:
    """``root/<class>/<image>`` (:func:`folder_images`); an image file is read and decoded only when indexed."""

    def __init__(self, root: Path, channels: int) -> None:
        self.channels = channels
        self.files, labels = folder_images(root)
        if labels is None:
            raise DataError(f"{root}: images at its top level and no class sub-folders: source image_folder reads "
                            "root/<class>/<image> (for one unlabelled set, put the images in one sub-folder)")
        self.labels = labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        return _decode(self.files[i].read_bytes(), str(self.files[i]), self.channels)


class _TorchvisionImages:
    """A ``torchvision.datasets`` class as a lazy image sequence. ``download`` is off by default: a missing
    dataset is a clear error, never a silent network access."""

    def __init__(self, spec: DatasetConfig, channels: int) -> None:
        import inspect
        import urllib.error

        import torchvision.datasets

        cls = getattr(torchvision.datasets, spec.dataset or "", None)
        if not inspect.isclass(cls):
            raise DataError(f"torchvision.datasets has no dataset class '{spec.dataset}'")
        accepted = inspect.signature(cls.__init__).parameters
        kwargs: dict = {"download": spec.download} if "download" in accepted else {}
        if "train" in accepted:
            if spec.subset not in ("train", "test"):
                raise DataError(f"torchvision {spec.dataset}: subset must be train or test, not '{spec.subset}'")
            kwargs["train"] = spec.subset == "train"
        elif "split" in accepted:
            kwargs["split"] = spec.subset
        try:
            self.dataset = cls(spec.path, **kwargs)
        except (RuntimeError, FileNotFoundError) as err:
            hint = "" if spec.download else " (download is off: copy the files there, or set download: true on a machine with internet)"
            raise DataError(f"torchvision {spec.dataset} not found under {spec.path}{hint}: {err}") from None
        except (urllib.error.URLError, OSError) as err:
            raise DataError(f"torchvision {spec.dataset}: download into {spec.path} failed (offline?): {err}") from None
        targets = next((getattr(self.dataset, a) for a in ("targets", "labels") if hasattr(self.dataset, a)), None)
        if targets is None:
            targets = [self.dataset[i][1] for i in range(len(self.dataset))]
        self.labels = checked_labels(np.asarray(targets), len(self.dataset), f"torchvision {spec.dataset}")
        self.channels = channels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> np.ndarray:
        image = self.dataset[i][0]
        return _as_channels(image, self.channels) if isinstance(image, Image.Image) else np.asarray(image)


def resize_center_crop(image: np.ndarray, size: int, channels: int, short_side: int | None = None) -> np.ndarray:
    """Resize the short side to ``short_side`` (default ``size``; bilinear, antialiased), centre-crop ``size``,
    convert channels. ImageNet's evaluation transform is ``short_side=256, size=224``."""
    img = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
    w, h = img.size
    scale = (short_side or size) / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return _as_channels(img.crop((left, top, left + size, top + size)), channels)


def _conform(images: list[np.ndarray] | np.ndarray, name: str, spec: DatasetConfig, data: DataConfig) -> np.ndarray:
    expected = (data.image_size, data.image_size, data.channels)
    if spec.resize:
        return np.stack([resize_center_crop(im, data.image_size, data.channels, data.resize_short_side) for im in images])
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
    from sklearn.model_selection import train_test_split  # here, not at the top: only prepare splits (0.8 s import)

    stratify = labels if (labels >= 0).all() and len(np.unique(labels)) > 1 else None
    idx, _ = train_test_split(np.arange(len(labels)), train_size=n, random_state=seed, stratify=stratify)
    return np.sort(idx)


def load_dataset(name: str, data: DataConfig, seed: int) -> ImageSet:
    """Load, filter, split and subsample one configured dataset into the configured image shape."""
    spec = data.datasets[name]
    rng = np.random.default_rng(seed)
    if spec.source == "photo_patches":
        raw = _photo_patches(_photos(Path(spec.path)), spec.n_patches, data.image_size, data.channels, rng)
        images, labels = list(raw.images), raw.labels
    elif spec.source == "npz":
        raw = _npz_decoded(Path(spec.path))
        images, labels = raw.images, raw.labels
    elif spec.source == "npz_jpeg":
        images = _JpegImages(Path(spec.path), data.channels)
        labels = images.labels
    elif spec.source == "image_folder":
        images = _FolderImages(Path(spec.path), data.channels)
        labels = images.labels
    else:
        images = _TorchvisionImages(spec, data.channels)
        labels = images.labels

    if len(labels) == 0:
        raise DataError(f"dataset '{name}': the {spec.source} source at {spec.path} holds no images")
    keep = np.arange(len(labels))
    if spec.classes is not None:
        keep = np.flatnonzero(np.isin(labels, spec.classes))
        if len(keep) == 0:
            raise DataError(f"dataset '{name}': no images of classes {spec.classes}")
    if spec.split != "all":
        from sklearn.model_selection import train_test_split  # (see _subsample)

        try:
            train_idx, test_idx = train_test_split(
                keep, test_size=spec.test_fraction, random_state=seed, stratify=labels[keep]
            )
        except ValueError as err:
            raise DataError(f"dataset '{name}': cannot split {len(keep)} images into train/test with "
                            f"test_fraction {spec.test_fraction}, stratified by class ({err})") from None
        keep = np.sort(train_idx if spec.split == "train" else test_idx)
    if spec.max_samples is not None:
        keep = keep[_subsample(labels[keep], spec.max_samples, seed)]

    selected = [images[i] for i in keep]
    array = _conform(selected, name, spec, data)
    log.info("dataset %s: %d images of shape %s from %s", name, len(keep), array.shape[1:], spec.source)
    return ImageSet(np.ascontiguousarray(array, dtype=np.uint8), labels[keep].astype(np.int64))


def save_image_set(path: str | Path, image_set: ImageSet) -> None:
    """Write atomically (temporary file, then rename): a killed run leaves no half-written set."""
    with atomic_path(path) as tmp:
        np.savez(tmp, images=image_set.images, labels=image_set.labels)


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


def read_images(path: str | Path, data: InputConfig) -> tuple[np.ndarray, list[str]]:
    """New inputs to score (``lowgrad score``, the monitor): an ``.npz`` of either layout, a folder of images, or an
    ImageFolder tree, brought to the run's ``data.image_size`` / ``channels`` as ``prepare`` brought its ``id_test``:
    with ``resize: true`` every image is resized (short side) and centre-cropped, as there; otherwise images of the
    run's shape are kept as they are and others resized the same way. Returns the uint8 images and a name per image
    (its file, or ``<file>#<index>``)."""
    path = Path(path)
    if path.is_dir():
        files, _ = folder_images(path)
        raw = [_decode(f.read_bytes(), str(f), data.channels) for f in files]
        names = [str(f.relative_to(path)) for f in files]
    elif path.suffix == ".npz" and path.is_file():
        try:
            with zipfile.ZipFile(path) as z:
                layout = {n.removesuffix(".npy") for n in z.namelist()}
        except zipfile.BadZipFile:
            layout = set()  # _open_npz says what is wrong with it
        if "jpeg" in layout:
            encoded = _JpegImages(path, data.channels)
            raw = [encoded[i] for i in range(len(encoded))]
        else:
            arrays = _open_npz(path, ("images",))
            raw = list(arrays["images"])
            if arrays["images"].dtype != np.uint8 or arrays["images"].ndim != 4 or arrays["images"].shape[-1] not in (1, 3):
                shape = arrays["images"].shape
                hint = (" (channels first? store them as N x H x W x C)" if len(shape) == 4 and shape[1] in (1, 3) else "")
                raise DataError(f"{path}: 'images' must be uint8 (N, H, W, C) with C 1 or 3, got "
                                f"{arrays['images'].dtype} {shape}{hint}")
        names = [f"{path.name}#{i}" for i in range(len(raw))]
    elif path.exists():
        raise DataError(f"{path}: not an .npz file or a folder of images")
    else:
        raise DataError(f"images not found: {path}")
    if not raw:
        raise DataError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    expected = (data.image_size, data.image_size, data.channels)
    datasets = getattr(data, "datasets", {})  # a run's: its id_test's resize rule; lowgrad.LowGrad's options have none
    always = "id_test" in datasets and datasets["id_test"].resize
    images = np.stack([im if im.shape == expected and not always
                       else resize_center_crop(im, data.image_size, data.channels, data.resize_short_side) for im in raw])
    return np.ascontiguousarray(images, dtype=np.uint8), names
