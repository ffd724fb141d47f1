"""Stage ``prepare@<set>``: load one configured image set, check it, write ``data/prepared/<set>.npz``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lowgrad.config import Params
from lowgrad.data import check_class_labels, load_dataset, save_image_set
from lowgrad.paths import PREPARED


def prepare(params: Params, name: str) -> None:
    """Load, filter, split and sub-sample one configured dataset; ID sets must have labels of the model's classes."""
    image_set = load_dataset(name, params.data, params.seed)
    if name in ("id_train", "id_test"):
        check_class_labels(image_set.labels, params.model.num_classes, f"dataset '{name}' labels (model.num_classes)")
    save_image_set(PREPARED.format(name=name), image_set)


def prepared_size(name: str, root: str | Path = ".") -> int:
    """Number of samples of a prepared set (reads its labels only)."""
    with np.load(Path(root) / PREPARED.format(name=name), allow_pickle=False) as z:
        return int(z["labels"].shape[0])
