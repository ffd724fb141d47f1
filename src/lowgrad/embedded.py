"""The embedded default's raw inputs (``data/embedded``), made from scikit-learn's bundled copies.

The files are committed, so a fresh clone runs with no download and no DVC remote, and DVC tracks them like any
other input. ``python -m lowgrad.embedded [DEST]`` writes them again (``tests/test_data.py`` checks that the
committed files equal what this writes).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from lowgrad.config import EMBEDDED_DIGITS, EMBEDDED_PHOTOS


def bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 ``(N, 8, 8, 1)`` images (0-16 scaled to 0-255, rounded) and labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None], bunch.target.astype(np.int64)


def bundled_photo_files() -> list[Path]:
    """scikit-learn's two bundled JPEG photos (china.jpg, flower.jpg), in sorted order."""
    from importlib import resources

    return sorted(Path(str(f)) for f in resources.files("sklearn.datasets.images").iterdir() if str(f).endswith(".jpg"))


def write_embedded(root: str | Path = ".") -> None:
    """Write ``data/embedded/digits.npz`` and copy the photos into ``data/embedded/photos`` under ``root``."""
    root = Path(root)
    images, labels = bundled_digits()
    (root / EMBEDDED_DIGITS).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(root / EMBEDDED_DIGITS, images=images, labels=labels)
    (root / EMBEDDED_PHOTOS).mkdir(parents=True, exist_ok=True)
    for photo in bundled_photo_files():
        shutil.copyfile(photo, root / EMBEDDED_PHOTOS / photo.name)


if __name__ == "__main__":
    write_embedded(sys.argv[1] if len(sys.argv) > 1 else ".")
