"""What the subspace and project stages share: the gradient rows of a set on the configured route."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from lowgrad.config import Params

if TYPE_CHECKING:  # torch costs seconds to import: stages that do not need it never load it
    from lowgrad.store import ChunkedStore
    from lowgrad.subspace import RowPasses


@contextlib.contextmanager
def stored_row_passes(params: Params, store: "ChunkedStore") -> Iterator["RowPasses"]:
    """Passes over a store's gradient rows: in this process, or reduced over a Dask cluster."""
    if "grads" not in store.columns:
        from lowgrad.errors import StoreError

        raise StoreError(f"{store.path} holds no gradients (written for the matrix-free route); rerun its extract stage")
    if not params.cluster.scheduler:
        from lowgrad.subspace import RowPasses

        yield RowPasses.of_store(store)
        return
    from lowgrad.scaleout import DaskRowPasses, dask_client

    with dask_client(params) as client:
        yield DaskRowPasses(client, store, params.cluster.shards or None)


def recomputed_rows(params: Params, name: str, root: str = ".", images=None):
    """The matrix-free route's exact gradient rows of one prepared set, or of ``images`` (uint8 N x H x W x C, new
    inputs), recomputed on every pass."""
    from lowgrad.data import load_image_set
    from lowgrad.matrix_free import exact_rows
    from lowgrad.models import load_classifier
    from lowgrad.paths import PREPARED

    if images is None:
        images = load_image_set(f"{root}/{PREPARED.format(name=name)}").images
    return exact_rows(params, load_classifier(params, root), images, desc=name)


@contextlib.contextmanager
def row_passes(params: Params, name: str) -> Iterator:
    """The normalisable gradient rows of set ``name`` on this configuration's route: recomputed (matrix-free),
    or read from its store (locally or on Dask)."""
    from lowgrad.route import Route

    if Route.from_params(params).recomputes_gradients:
        yield recomputed_rows(params, name)
        return
    from lowgrad.paths import EXTRACTED
    from lowgrad.store import ChunkedStore

    with stored_row_passes(params, ChunkedStore.open(EXTRACTED.format(name=name))) as passes:
        yield passes


def stored_sketch_layout(name: str):
    """The sketch (its layout, with where its random draws were made) that set ``name``'s stored rows came through."""
    from lowgrad.paths import EXTRACTED
    from lowgrad.store import ChunkedStore

    return ChunkedStore.open(EXTRACTED.format(name=name)).meta.get("sketch_layers")
