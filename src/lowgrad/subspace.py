"""Kernel normalisation (NFK / NTK) and the low-dimensional gradient subspace (docs/method.md sections 2-4).

Everything here streams over row blocks of the per-sample gradient matrix ``G`` (N x P): a *block source*
is a zero-argument callable returning a fresh iterator of ``(rows, block)`` pairs, so each pass over the
data re-reads the zarr store chunk by chunk and ``G`` is never held in memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from lowgrad.errors import GradientError, StoreError
from lowgrad.paths import atomic_path
from lowgrad.store import jsonable

log = logging.getLogger(__name__)

COMPONENT_CHUNK_ROWS = 65536  # rows of V per zarr chunk

BlockSource = Callable[[], Iterable[tuple[slice, np.ndarray]]]


def merge_moments(a: tuple | None, b: tuple | None) -> tuple | None:
    """Chan et al.'s pairwise merge of ``(n, mean, M2)`` (float64 arrays or tensors; ``None`` = empty)."""
    if a is None or b is None:
        return a if b is None else b
    (na, ma, sa), (nb, mb, sb) = a, b
    total = na + nb
    delta = mb - ma
    return total, ma + delta * (nb / total), sa + sb + delta**2 * (na * nb / total)


def add_block_moments(acc: tuple | None, block) -> tuple | None:
    """Merge the rows of one block (an array or tensor, rows = samples; left unchanged) into running float64
    ``(n, mean, M2)``; an empty block leaves ``acc`` as it is. A float CPU tensor takes one pass of
    :func:`lowgrad.moments_kernel.shifted_sums`: its deviations from the running mean (from its first row when there
    is none yet), and their squares, summed in float64 without a float64 copy of the block (on 2 cores a ResNet-18
    layer4 block of 64 rows in a quarter of the time of a float64 copy centred and squared in place, which any other
    tensor still takes)."""
    if len(block) == 0:
        return acc
    if isinstance(block, np.ndarray):
        mean = block.mean(0)
        return merge_moments(acc, (block.shape[0], mean, ((block - mean) ** 2).sum(0)))
    import torch

    if block.device.type == "cpu" and block.dim() >= 2 and block.dtype in (torch.float32, torch.float64):
        return merge_moments(acc, _shifted_block_moments(block, None if acc is None else acc[1]))
    centred = block.to(torch.float64, copy=True)
    mean = centred.sum(0) / len(centred)
    centred.sub_(mean).square_()
    return merge_moments(acc, (len(centred), mean, centred.sum(0)))


def _shifted_block_moments(block, centre) -> tuple:
    """``(n, mean, M2)`` of a float CPU tensor's rows (any trailing shape) as float64 tensors of that shape, from
    the sums of their deviations from ``centre`` (a running mean, close to the block's own, so ``M2 = S2 - S1^2 / n``
    does not cancel; the block's first row when ``None``)."""
    import torch

    from lowgrad.moments_kernel import shifted_sums

    n, shape = len(block), block.shape[1:]
    x = block.detach().reshape(n, -1).contiguous().numpy()
    shift = np.array(x[0] if centre is None else np.asarray(centre).reshape(-1), dtype=np.float64)  # a copy
    if shift.shape != (x.shape[1],):  # the kernel checks no bounds
        raise ValueError(f"running mean of {shift.size} values for rows of {x.shape[1]}")
    s1, s2 = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    shifted_sums(x, shift, s1, s2)
    mean, m2 = shift + s1 / n, np.maximum(s2 - s1 * s1 / n, 0.0)
    return n, torch.from_numpy(mean).reshape(shape), torch.from_numpy(m2).reshape(shape)


def partial_pass(
    kind: str, blocks: Iterable[tuple[slice, np.ndarray]], arg: np.ndarray | None = None,
    shift: np.ndarray | None = None, scale: np.ndarray | None = None,
):
    """One pass over some row blocks of ``Phi = (G - shift) * scale`` (``G`` when no shift/scale):

    - ``moments``: ``(n, mean, M2)`` of the rows;
    - ``times``: ``[(rows, Phi_rows @ arg, squared norm of each row)]``;
    - ``transpose_times``: ``Phi_rows^T @ arg[rows]`` summed over the blocks.
    The same function runs in this process or on a Dask worker over one shard of chunks."""
    acc = None
    pieces = []
    for rows, block in blocks:
        b = np.array(block, dtype=np.float64)  # a copy, normalised in place (no temporaries of the block's size)
        if shift is not None:
            b -= shift
            b *= scale
        if kind == "moments":
            acc = add_block_moments(acc, b)
        elif kind == "times":
            pieces.append((rows, b @ arg, np.einsum("np,np->n", b, b)))
        elif kind == "transpose_times":
            part = b.T @ arg[rows]
            acc = part if acc is None else acc + part
        else:
            raise ValueError(f"unknown pass kind {kind!r}")
    return pieces if kind == "times" else acc


def combine_partials(kind: str, partials: list, n_rows: int):
    """Reduce the per-shard results of :func:`partial_pass`."""
    if kind == "moments":
        out = None
        for part in partials:
            out = merge_moments(out, part)
        return out
    if kind == "times":  # (Phi @ arg, squared norm of every row of Phi)
        pieces = [p for part in partials for p in part]
        out, sqnorm = np.empty((n_rows, pieces[0][1].shape[1])), np.empty(n_rows)
        for rows, values, sq in pieces:
            out[rows], sqnorm[rows] = values, sq
        return out, sqnorm
    parts = [p for p in partials if p is not None]
    return sum(parts[1:], parts[0])


def nfk_scale(fisher_diag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w = d^(-1/2)``; zero-variance entries take the largest finite ``w`` (docs/method.md 2; 1.0 if none is
    finite). Returns ``(w, d > 0)``."""
    positive = fisher_diag > 0
    scale = np.zeros_like(fisher_diag)
    scale[positive] = 1.0 / np.sqrt(fisher_diag[positive])
    scale[~positive] = scale[positive].max() if positive.any() else 1.0
    return scale, positive


class NumpyOps:
    """The randomized SVD's array operations in float64 NumPy (:class:`lowgrad.matrix_free.TorchOps`: the same
    on a torch device)."""

    @staticmethod
    def gaussian(seed: int, dim: int, width: int) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((dim, width))

    @staticmethod
    def orthonormal(a: np.ndarray) -> np.ndarray:
        return np.linalg.qr(a)[0]

    @staticmethod
    def top_right_vectors(bt: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The top-``k`` right singular vectors of ``B`` (= left ones of ``B^T = U S W^T``), their values, and
        ``W[:, :k]`` (width x k): the kernel rows' scores on column ``j`` are ``s_j Q W[:, j]``."""
        u, s, wt = np.linalg.svd(bt, full_matrices=False)
        return u[:, :k], s[:k], wt[:k].T


def row_blocks(rows: np.ndarray, block_rows: int) -> Iterator[tuple[slice, np.ndarray]]:
    """``(rows, block)`` over an array in memory, ``block_rows`` rows at a time (a block source's iterator)."""
    for start in range(0, len(rows), block_rows):
        yield slice(start, min(start + block_rows, len(rows))), rows[start : start + block_rows]


class RowPasses:
    """Passes over the rows of ``Phi``, run in this process. The row-pass protocol (``n_rows``, ``dim``, ``ops``,
    ``normalised``, ``run``) has two other backends: :class:`lowgrad.scaleout.DaskRowPasses` runs the same
    :func:`partial_pass` on Dask workers, one shard of zarr chunks each, and reduces the partials;
    :class:`lowgrad.matrix_free.GradientRows` recomputes exact gradients on a torch device at every pass."""

    ops = NumpyOps()

    def __init__(self, blocks: BlockSource, n_rows: int, dim: int, shift=None, scale=None) -> None:
        self.blocks, self.n_rows, self.dim = blocks, n_rows, dim
        self.shift, self.scale = shift, scale

    @classmethod
    def of_array(cls, rows: np.ndarray, block_rows: int | None = None) -> "RowPasses":
        """Passes over gradient rows held in memory, ``block_rows`` at a time (all at once when None)."""
        step = block_rows or max(len(rows), 1)
        return cls(lambda: row_blocks(rows, step), len(rows), rows.shape[1])

    @classmethod
    def of_store(cls, store) -> "RowPasses":
        """Passes over a store's gradient rows (``grads``), chunk by chunk, each chunk checked as it is read."""
        return cls(lambda: store.iter_chunks("grads"), store.n_rows, store.columns["grads"][0])

    def normalised(self, shift: np.ndarray, scale: np.ndarray) -> "RowPasses":
        return RowPasses(self.blocks, self.n_rows, self.dim, shift, scale)

    def run(self, kind: str, arg: np.ndarray | None = None):
        return combine_partials(kind, [partial_pass(kind, self.blocks(), arg, self.shift, self.scale)], self.n_rows)

    def phi_blocks(self) -> BlockSource:
        """Sequential block source of ``Phi`` (for inherently sequential fits such as IncrementalPCA)."""

        def iterate() -> Iterator[tuple[slice, np.ndarray]]:
            for rows, block in self.blocks():
                b = np.asarray(block, dtype=np.float64)
                yield rows, b if self.shift is None else (b - self.shift) * self.scale

        return iterate


class KernelNormalizer:
    """NFK: ``phi = w * (g - z)`` with ``z`` the mean and ``w = d^(-1/2)`` the inverse root of the diagonal
    Fisher of centred gradients (zero-variance entries take the largest finite ``w``). NTK: ``phi = g``.
    ``center``: ``phi = g - z`` (NFK on Kronecker sketches, whose rows already carry ``w``)."""

    def __init__(self, kernel: str) -> None:
        if kernel not in ("nfk", "ntk", "center"):
            raise ValueError(f"kernel must be 'nfk', 'ntk' or 'center', got {kernel!r}")
        self.kernel = kernel

    def fit(self, blocks: "BlockSource | RowPasses") -> "KernelNormalizer":
        """One pass; mean and variance merged block by block in float64 (Chan et al.'s pairwise update)."""
        passes = blocks if hasattr(blocks, "run") else RowPasses(blocks, 0, 0)
        return self.fit_moments(passes.run("moments"))

    def fit_moments(self, moments: tuple | None) -> "KernelNormalizer":
        """Fit from float64 ``(n, mean, M2)`` of the kernel set's gradients (``None``: no samples)."""
        if moments is None:
            raise GradientError("cannot fit the kernel normaliser on an empty kernel set")
        n, mean, m2 = moments
        self.n_samples_ = n
        self.mean_ = mean
        self.fisher_diag_ = m2 / n
        if self.kernel in ("ntk", "center"):
            self.shift_ = mean if self.kernel == "center" else np.zeros_like(mean)
            self.scale_ = np.ones_like(mean)
            return self
        scale, positive = nfk_scale(self.fisher_diag_)
        if not positive.any():
            raise GradientError("every gradient coordinate has zero variance on the kernel set")
        self.n_zero_variance_ = int((~positive).sum())
        self.shift_ = mean
        self.scale_ = scale
        return self

    def transform(self, g: np.ndarray) -> np.ndarray:
        return (np.asarray(g, dtype=np.float64) - self.shift_) * self.scale_


def _numpy(a) -> np.ndarray:
    """A NumPy array from a NumPy array or a (device) torch tensor."""
    return a.cpu().numpy() if hasattr(a, "cpu") else np.asarray(a)


def orient_by_scores(v, scores: np.ndarray):
    """``v`` (P x k, NumPy or torch) with each column's sign decided by the kernel rows' scores on it (N x k):
    their third moment is made positive, so a column's heavier tail is its ``+`` side (the tail a one-sided clip
    such as ReAct's cuts); exactly symmetric scores fall back to the largest-magnitude score being positive.

    The decision lives in sample space on purpose. A sign read off ``v``'s own entries depends on the
    coordinates ``v`` lives in (parameters on the exact route, sketch buckets on a sketched one), so two routes
    on the same images disagreed on about half the columns (18 of 32 on ResNet-20), and every ``G_low``
    detector that is not sign-invariant (ReAct's clip, a probe trained from a random start) moved with it."""
    scores = np.asarray(scores, dtype=np.float64)
    third = np.sum(scores**3, axis=0)
    largest = scores[np.abs(scores).argmax(axis=0), np.arange(scores.shape[1])]
    signs = np.where(third != 0, np.sign(third), np.sign(largest))
    signs[signs == 0] = 1.0
    return v * (v.new_tensor(signs) if hasattr(v, "new_tensor") else signs)  # new_tensor: the matrix-free route's


def randomized_svd(passes: RowPasses, k: int, oversample: int, power_iters: int, seed: int):
    """Top-``k`` right singular vectors of ``Phi`` (Halko, Martinsson & Tropp 2011, algorithm 4.4 + 5.1):
    ``2 * power_iters + 2`` passes over the rows, columns sorted by singular value, in the array backend of
    the passes (``passes.ops``: NumPy, or torch on the device for recomputed gradients).

    Returns ``(V (P x k), singular values (k,), squared Frobenius norm of Phi)``.
    """
    n_rows, dim, ops = passes.n_rows, passes.dim, passes.ops
    width = min(k + oversample, dim, n_rows)
    if k > width:
        raise GradientError(f"subspace.k={k} exceeds min(N={n_rows}, P={dim})")
    y, sqnorm = passes.run("times", ops.gaussian(seed, dim, width))  # also ||Phi||_F^2
    for it in range(power_iters):
        z = passes.run("transpose_times", ops.orthonormal(y))
        y, _ = passes.run("times", ops.orthonormal(z))
        log.info("randomized SVD: power iteration %d/%d done", it + 1, power_iters)
    q = ops.orthonormal(y)
    bt = passes.run("transpose_times", q)  # Phi^T Q = (Q^T Phi)^T, P x width
    v, s, w = ops.top_right_vectors(bt, k)
    return orient_by_scores(v, _numpy(q @ w)), s, float(sqnorm.sum())


def incremental_pca(phi: BlockSource, k: int, dim: int) -> tuple[np.ndarray, np.ndarray, float]:
    """scikit-learn's ``IncrementalPCA`` fed block by block. Blocks are merged so every ``partial_fit`` batch
    has at least ``k`` rows (a short last block joins the batch before it)."""
    from sklearn.decomposition import IncrementalPCA  # here, not at the top: the project stage never needs it (1.2 s)

    ipca = IncrementalPCA(n_components=k)
    ready: np.ndarray | None = None  # a full batch held back until we know whether a short tail follows
    pending: list[np.ndarray] = []
    total_sq = 0.0
    for _, block in phi():
        total_sq += float(np.square(block).sum())
        pending.append(block)
        if sum(b.shape[0] for b in pending) >= k:
            if ready is not None:
                ipca.partial_fit(ready)
            ready, pending = np.concatenate(pending), []
    if pending:
        tail = np.concatenate(pending)
        ready = tail if ready is None else np.concatenate([ready, tail])
    if ready is None or (not hasattr(ipca, "components_") and ready.shape[0] < k):
        raise GradientError(f"subspace.k={k} exceeds the number of kernel samples")
    ipca.partial_fit(ready)
    total_sq_centred = total_sq - ipca.n_samples_seen_ * float(np.square(ipca.mean_).sum())
    v = ipca.components_.T.copy()
    scores = np.concatenate([(np.asarray(block, dtype=np.float64) - ipca.mean_) @ v for _, block in phi()])
    return orient_by_scores(v, scores), ipca.singular_values_.copy(), total_sq_centred


def average_gradient_basis(passes: RowPasses, labels: np.ndarray) -> np.ndarray:
    """One unit-norm column per class: the class mean of ``phi`` (docs/method.md section 3), not orthogonalised."""
    classes = np.unique(labels[labels >= 0])
    onehot = (labels[:, None] == classes[None, :]).astype(np.float64)
    means = passes.run("transpose_times", onehot) / np.maximum(onehot.sum(axis=0), 1)
    norms = np.linalg.norm(means, axis=0)
    if (norms == 0).any():
        raise GradientError("a class has a zero average gradient; the average-gradient basis is undefined")
    return means / norms


def _sketch_hint(mine: Any, theirs: Any) -> str:
    drawn = [layout.get("omega_drawn_on") if isinstance(layout, dict) else None for layout in (mine, theirs)]
    if drawn[0] != drawn[1]:
        return (f"the dense sketch's Omega depends on the device it is drawn on; use {drawn[0]} (device: "
                f"{'cpu' if drawn[0] == 'cpu' else 'cuda'}) or extract every set again on this one")
    return "extract every set again with the same sketch"


class GradientSubspace:
    """Estimator: ``fit`` the kernel normaliser and basis on the kernel set, ``transform`` gradients to
    ``G_low = phi(g) @ V`` (N x k)."""

    def __init__(
        self,
        *,
        kernel: str,
        basis: str,
        method: str,
        k: int,
        oversample: int | None,
        power_iters: int | None,
        seed: int | None,
    ) -> None:
        """The options of ``params.yaml``'s ``subspace`` section (:class:`lowgrad.config.SubspaceConfig`, where their
        defaults are) and the seed; ``kernel`` is the route's (:attr:`lowgrad.route.Route.subspace_kernel`)."""
        self.kernel, self.basis, self.method, self.k = kernel, basis, method, k
        self.oversample, self.power_iters, self.seed = oversample, power_iters, seed
        self.sketch_layout_: Any = None  # the sketch the fitted rows came through (its layout), None for exact rows

    def check_rows_from(self, sketch_layout: Any, what: str) -> None:
        """Refuse rows sketched otherwise than the ones this basis was fitted on (a dense ``Omega`` drawn on
        another device, another sketch), naming both; rows of the exact route (no layout) are not checked."""
        if self.sketch_layout_ is None and sketch_layout is None:
            return
        mine, theirs = jsonable(self.sketch_layout_), jsonable(sketch_layout)
        if mine != theirs:
            raise StoreError(f"{what} were sketched with {theirs}, the basis's rows with {mine}: "
                             + _sketch_hint(mine, theirs))

    def fit(
        self, blocks: "BlockSource | RowPasses", n_rows: int | None = None, dim: int | None = None,
        labels: np.ndarray | None = None,
    ) -> "GradientSubspace":
        """Fit on the kernel set's gradient rows: a block source (with ``n_rows``, ``dim``) or row passes of any
        backend (:class:`RowPasses`, Dask, recomputed gradients). Methods: ``randomized`` and
        ``exact_randomized`` (the randomized SVD, in the passes' array backend), ``incremental``
        (scikit-learn, local blocks only)."""
        passes = blocks if hasattr(blocks, "run") else RowPasses(blocks, n_rows, dim)
        self.normalizer_ = KernelNormalizer(self.kernel).fit(passes)
        phi = passes.normalised(self.normalizer_.shift_, self.normalizer_.scale_)
        if self.basis == "average_gradient":
            if labels is None:
                raise GradientError("the average-gradient basis needs the kernel set's labels")
            self.components_ = average_gradient_basis(phi, labels)
            projected, sqnorm = phi.run("times", self.components_)
            self.total_sq_ = float(sqnorm.sum())
            self.singular_values_ = np.linalg.norm(projected, axis=0)
        elif self.method in ("randomized", "exact_randomized"):
            self.components_, self.singular_values_, self.total_sq_ = randomized_svd(
                phi, self.k, self.oversample, self.power_iters, self.seed
            )
        elif self.method == "incremental":
            self.components_, self.singular_values_, self.total_sq_ = incremental_pca(phi.phi_blocks(), self.k, passes.dim)
        else:
            raise ValueError(f"unknown method {self.method!r}")
        self.explained_variance_ratio_ = self.singular_values_**2 / max(self.total_sq_, 1e-300)
        return self

    def transform(self, g: np.ndarray) -> np.ndarray:
        return self.normalizer_.transform(g) @ self.components_

    def transform_blocks(self, blocks: "BlockSource | RowPasses", n_rows: int | None = None) -> np.ndarray:
        return self.transform_blocks_with_sqnorm(blocks, n_rows)[0]

    def transform_blocks_with_sqnorm(
        self, blocks: "BlockSource | RowPasses", n_rows: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(G_low, ||phi||^2 per row)`` as NumPy arrays, in one pass over the rows (any backend)."""
        passes = blocks if hasattr(blocks, "run") else RowPasses(blocks, n_rows, self.components_.shape[0])
        g_low, sqnorm = passes.normalised(self.normalizer_.shift_, self.normalizer_.scale_).run("times", self.components_)
        return _numpy(g_low), _numpy(sqnorm)

    # -- persistence ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Normaliser and spectrum in ``path`` (npz); the basis ``V`` (P x k) as the chunked zarr array
        ``path.with_suffix('.zarr')``, written block by block (``components_``: a NumPy array or a torch tensor)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        v = self.components_
        arr = zarr.create_array(
            str(path.with_suffix(".zarr")), overwrite=True, shape=tuple(v.shape), compressors=None,
            dtype="float32" if hasattr(v, "cpu") else v.dtype,  # a torch tensor from the matrix-free route
            chunks=(min(COMPONENT_CHUNK_ROWS, v.shape[0]), v.shape[1]),
        )
        for start in range(0, v.shape[0], COMPONENT_CHUNK_ROWS):
            block = v[start : start + COMPONENT_CHUNK_ROWS]
            arr[start : start + COMPONENT_CHUNK_ROWS] = block.cpu().numpy() if hasattr(block, "cpu") else block
        with atomic_path(path) as tmp:
            np.savez(
                tmp,
                settings=np.array([self.kernel, self.basis, self.method]),
                k=v.shape[1],
                shift=self.normalizer_.shift_,
                scale=self.normalizer_.scale_,
                singular_values=self.singular_values_,
                explained_variance_ratio=self.explained_variance_ratio_,
                total_sq=self.total_sq_,
                **({} if self.sketch_layout_ is None else {"sketch_layout": np.array(json.dumps(self.sketch_layout_))}),
            )

    @classmethod
    def load(cls, path: str | Path, lazy: bool = False, dim: int | None = None, **settings: str) -> "GradientSubspace":
        """``lazy``: ``components_`` stays the zarr array (read chunk by chunk by the caller). ``dim`` (the width
        of the rows to project) and ``settings`` (``kernel``, ``basis``, ``method``) are checked against what
        was fitted: a stale basis is an error, never a silent projection."""
        path = Path(path)
        with np.load(path, allow_pickle=False) as z:
            kernel, basis, method = (str(s) for s in z["settings"])
            fitted = {"kernel": kernel, "basis": basis, "method": method}
            wrong = {key: (fitted[key], want) for key, want in settings.items() if fitted[key] != want}
            if dim is not None and len(z["scale"]) != dim:
                wrong["P"] = (len(z["scale"]), dim)
            if wrong:
                detail = ", ".join(f"{key} {got} (expected {want})" for key, (got, want) in wrong.items())
                raise StoreError(f"{path} was fitted for other rows: {detail}; rerun the subspace stage")
            sub = cls(kernel=kernel, basis=basis, method=method, k=int(z["k"]), oversample=None, power_iters=None,
                      seed=None)  # how the basis was fitted is not kept: a loaded basis is never refitted
            sub.normalizer_ = KernelNormalizer(kernel)
            sub.normalizer_.shift_, sub.normalizer_.scale_ = z["shift"], z["scale"]
            sub.singular_values_ = z["singular_values"]
            sub.explained_variance_ratio_, sub.total_sq_ = z["explained_variance_ratio"], float(z["total_sq"])
            sub.sketch_layout_ = json.loads(str(z["sketch_layout"])) if "sketch_layout" in z.files else None
        arr = zarr.open_array(str(path.with_suffix(".zarr")), mode="r")
        sub.components_ = arr if lazy else arr[:]
        return sub
