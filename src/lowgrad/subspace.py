"""Kernel normalisation (NFK / NTK) and the low-dimensional gradient subspace (METHOD.md sections 2-4).

Everything here streams over row blocks of the per-sample gradient matrix ``G`` (N x P): a *block source*
is a zero-argument callable returning a fresh iterator of ``(rows, block)`` pairs, so each pass over the
data re-reads the zarr store chunk by chunk and ``G`` is never held in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from sklearn.decomposition import IncrementalPCA

from lowgrad.errors import GradientError

log = logging.getLogger(__name__)

BlockSource = Callable[[], Iterable[tuple[slice, np.ndarray]]]


class KernelNormalizer:
    """NFK: ``phi = w * (g - z)`` with ``z`` the mean and ``w = d^(-1/2)`` the inverse root of the diagonal
    Fisher of centred gradients (zero-variance entries take the largest finite ``w``). NTK: ``phi = g``."""

    def __init__(self, kernel: str = "nfk") -> None:
        if kernel not in ("nfk", "ntk"):
            raise ValueError(f"kernel must be 'nfk' or 'ntk', got {kernel!r}")
        self.kernel = kernel

    def fit(self, blocks: BlockSource) -> "KernelNormalizer":
        """One pass; mean and variance merged block by block in float64 (Chan et al.'s pairwise update)."""
        n, mean, m2 = 0, None, None
        for _, block in blocks():
            b = np.asarray(block, dtype=np.float64)
            nb = b.shape[0]
            bmean = b.mean(axis=0)
            bm2 = ((b - bmean) ** 2).sum(axis=0)
            if mean is None:
                n, mean, m2 = nb, bmean, bm2
                continue
            delta = bmean - mean
            total = n + nb
            mean = mean + delta * (nb / total)
            m2 = m2 + bm2 + delta**2 * (n * nb / total)
            n = total
        if mean is None:
            raise GradientError("cannot fit the kernel normaliser on an empty kernel set")
        self.n_samples_ = n
        self.mean_ = mean
        self.fisher_diag_ = m2 / n
        if self.kernel == "ntk":
            self.shift_ = np.zeros_like(mean)
            self.scale_ = np.ones_like(mean)
            return self
        positive = self.fisher_diag_ > 0
        if not positive.any():
            raise GradientError("every gradient coordinate has zero variance on the kernel set")
        scale = np.zeros_like(mean)
        scale[positive] = 1.0 / np.sqrt(self.fisher_diag_[positive])
        scale[~positive] = scale[positive].max()
        self.n_zero_variance_ = int((~positive).sum())
        self.shift_ = mean
        self.scale_ = scale
        return self

    def transform(self, g: np.ndarray) -> np.ndarray:
        return (np.asarray(g, dtype=np.float64) - self.shift_) * self.scale_

    def source(self, blocks: BlockSource) -> BlockSource:
        """The block source of ``phi`` rows for a block source of gradient rows."""

        def iterate() -> Iterator[tuple[slice, np.ndarray]]:
            for rows, block in blocks():
                yield rows, self.transform(block)

        return iterate


def _orthonormal(a: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(a)
    return q


def _fix_signs(v: np.ndarray) -> np.ndarray:
    """Deterministic sign per column: the entry of largest magnitude is positive."""
    idx = np.abs(v).argmax(axis=0)
    signs = np.sign(v[idx, np.arange(v.shape[1])])
    signs[signs == 0] = 1.0
    return v * signs


def _stack_rows(phi: BlockSource, right: np.ndarray, n_rows: int) -> np.ndarray:
    """``Phi @ right`` (N x l), one pass."""
    out = np.empty((n_rows, right.shape[1]))
    for rows, block in phi():
        out[rows] = block @ right
    return out


def _transpose_times(phi: BlockSource, left: np.ndarray, dim: int) -> np.ndarray:
    """``Phi.T @ left`` (P x l), one pass."""
    out = np.zeros((dim, left.shape[1]))
    for rows, block in phi():
        out += block.T @ left[rows]
    return out


def randomized_svd(
    phi: BlockSource, n_rows: int, dim: int, k: int, oversample: int, power_iters: int, seed: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Top-``k`` right singular vectors of the streamed matrix ``Phi`` (Halko, Martinsson & Tropp 2011,
    algorithm 4.4 + 5.1): ``2 * power_iters + 2`` passes, columns sorted by singular value.

    Returns ``(V (P x k), singular values (k,), squared Frobenius norm of Phi)``.
    """
    width = min(k + oversample, dim, n_rows)
    if k > width:
        raise GradientError(f"subspace.k={k} exceeds min(N={n_rows}, P={dim})")
    rng = np.random.default_rng(seed)
    omega = rng.standard_normal((dim, width))
    y = np.empty((n_rows, width))
    total_sq = 0.0
    for rows, block in phi():  # first pass also measures ||Phi||_F^2 for explained-variance ratios
        y[rows] = block @ omega
        total_sq += float(np.square(block).sum())
    for it in range(power_iters):
        z = _transpose_times(phi, _orthonormal(y), dim)
        y = _stack_rows(phi, _orthonormal(z), n_rows)
        log.info("randomized SVD: power iteration %d/%d done", it + 1, power_iters)
    q = _orthonormal(y)
    bt = _transpose_times(phi, q, dim)  # Phi^T Q = (Q^T Phi)^T, P x width
    u, s, _ = np.linalg.svd(bt, full_matrices=False)
    return _fix_signs(u[:, :k]), s[:k], total_sq


def incremental_pca(phi: BlockSource, k: int, dim: int) -> tuple[np.ndarray, np.ndarray, float]:
    """scikit-learn's ``IncrementalPCA`` fed block by block. Blocks are merged so every ``partial_fit`` batch
    has at least ``k`` rows (a short last block joins the batch before it)."""
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
    return _fix_signs(ipca.components_.T.copy()), ipca.singular_values_.copy(), total_sq_centred


def average_gradient_basis(phi: BlockSource, labels: np.ndarray, dim: int) -> np.ndarray:
    """One unit-norm column per class: the class mean of ``phi`` (METHOD.md section 3), not orthogonalised."""
    classes = np.unique(labels[labels >= 0])
    sums = np.zeros((dim, len(classes)))
    counts = np.zeros(len(classes))
    for rows, block in phi():
        onehot = (labels[rows][:, None] == classes[None, :]).astype(np.float64)
        sums += block.T @ onehot
        counts += onehot.sum(axis=0)
    means = sums / np.maximum(counts, 1)
    norms = np.linalg.norm(means, axis=0)
    if (norms == 0).any():
        raise GradientError("a class has a zero average gradient; the average-gradient basis is undefined")
    return means / norms


class GradientSubspace:
    """Estimator: ``fit`` the kernel normaliser and basis on the kernel set, ``transform`` gradients to
    ``G_low = phi(g) @ V`` (N x k)."""

    def __init__(
        self,
        kernel: str = "nfk",
        basis: str = "pca",
        method: str = "randomized",
        k: int = 32,
        oversample: int = 10,
        power_iters: int = 4,
        seed: int = 0,
    ) -> None:
        self.kernel, self.basis, self.method, self.k = kernel, basis, method, k
        self.oversample, self.power_iters, self.seed = oversample, power_iters, seed

    def fit(self, blocks: BlockSource, n_rows: int, dim: int, labels: np.ndarray | None = None) -> "GradientSubspace":
        self.normalizer_ = KernelNormalizer(self.kernel).fit(blocks)
        phi = self.normalizer_.source(blocks)
        if self.basis == "average_gradient":
            if labels is None:
                raise GradientError("the average-gradient basis needs the kernel set's labels")
            self.components_ = average_gradient_basis(phi, labels, dim)
            self.singular_values_ = np.linalg.norm(_stack_rows(phi, self.components_, n_rows), axis=0)
            self.total_sq_ = float(sum(np.square(b).sum() for _, b in phi()))
        elif self.method == "randomized":
            self.components_, self.singular_values_, self.total_sq_ = randomized_svd(
                phi, n_rows, dim, self.k, self.oversample, self.power_iters, self.seed
            )
        elif self.method == "incremental":
            self.components_, self.singular_values_, self.total_sq_ = incremental_pca(phi, self.k, dim)
        else:
            raise ValueError(f"unknown method {self.method!r}")
        self.explained_variance_ratio_ = self.singular_values_**2 / max(self.total_sq_, 1e-300)
        return self

    def transform(self, g: np.ndarray) -> np.ndarray:
        return self.normalizer_.transform(g) @ self.components_

    def transform_blocks(self, blocks: BlockSource, n_rows: int) -> np.ndarray:
        return _stack_rows(self.normalizer_.source(blocks), self.components_, n_rows)

    # -- persistence ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            settings=np.array([self.kernel, self.basis, self.method]),
            k=self.components_.shape[1],
            shift=self.normalizer_.shift_,
            scale=self.normalizer_.scale_,
            components=self.components_,
            singular_values=self.singular_values_,
            explained_variance_ratio=self.explained_variance_ratio_,
            total_sq=self.total_sq_,
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "GradientSubspace":
        with np.load(path, allow_pickle=False) as z:
            kernel, basis, method = (str(s) for s in z["settings"])
            sub = cls(kernel=kernel, basis=basis, method=method, k=int(z["k"]))
            sub.normalizer_ = KernelNormalizer(kernel)
            sub.normalizer_.shift_, sub.normalizer_.scale_ = z["shift"], z["scale"]
            sub.components_, sub.singular_values_ = z["components"], z["singular_values"]
            sub.explained_variance_ratio_, sub.total_sq_ = z["explained_variance_ratio"], float(z["total_sq"])
        return sub
