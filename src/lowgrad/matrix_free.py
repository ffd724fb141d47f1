"""Matrix-free exact PCA of per-sample gradients (``subspace.method: exact_randomized``).

The paper's PCA of the NFK rows ``phi_i = w * (g_i - mu)`` (N x P) without storing any gradient: a
randomized SVD (Halko, Martinsson & Tropp 2011, algorithms 4.4 + 5.1) whose every pass recomputes the exact
per-sample gradients batch by batch on the device (``torch.func``). Passes over the kernel set:
one for ``mu`` and ``w`` (float64 moments, as :class:`lowgrad.subspace.KernelNormalizer`), one for
``Phi Omega``, two per power iteration and one for ``Phi^T Q``: ``2 * power_iters + 3`` in all.

Memory: the P-side matrices (``Omega`` and ``Phi^T Q``, P x (k + oversample) float32) live on the device
(ResNet-18 at k + oversample = 250: 11.2 GB), plus one batch of gradients (batch x P float32; the moments
pass holds about three batch x P float64 temporaries: size ``gradient.batch_size`` to fit). The basis ``V``
(P x k) is written as a chunked zarr array and projections stream it back chunk by chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
import zarr
from tqdm import tqdm

from lowgrad.data import to_tensor_batch
from lowgrad.dense_sketch import BLOCK_ROWS, omega_block
from lowgrad.errors import GradientError
from lowgrad.gradients import PerSampleGradients
from lowgrad.subspace import GradientSubspace, KernelNormalizer, add_block_moments

log = logging.getLogger(__name__)

class GradientRows:
    """The rows ``phi_i = g_i * scale - offset`` of one image set, recomputed batch by batch, never stored."""

    def __init__(
        self, gradients: PerSampleGradients, images: np.ndarray, mean: list[float], std: list[float],
        batch_size: int, desc: str = "gradients",
    ) -> None:
        self.gradients, self.images, self.mean, self.std = gradients, images, mean, std
        self.batch_size, self.desc = batch_size, desc
        self.device = next(iter(gradients.params.values())).device
        self.n_rows, self.dim = len(images), gradients.dim
        self.scale: torch.Tensor | None = None
        self.offset: torch.Tensor | None = None

    def __iter__(self) -> Iterator[tuple[slice, torch.Tensor]]:
        for start in tqdm(range(0, self.n_rows, self.batch_size), desc=self.desc, unit="batch", leave=False):
            rows = slice(start, min(start + self.batch_size, self.n_rows))
            x = to_tensor_batch(self.images[rows], self.mean, self.std).to(self.device)
            g = self.gradients(x)[0]  # raises on non-finite gradients
            if self.scale is not None:
                g = g * self.scale
            if self.offset is not None:
                g = g - self.offset
            yield rows, g

    def times(self, m: torch.Tensor) -> torch.Tensor:
        """``Phi @ m`` (N x width) in one pass."""
        return self.times_with_sqnorm(m)[0]

    def times_with_sqnorm(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Phi @ m, ||phi_i||^2 per row in float64)`` in one pass."""
        out = torch.empty(self.n_rows, m.shape[1], dtype=torch.float32, device=self.device)
        sqnorm = torch.empty(self.n_rows, dtype=torch.float64, device=self.device)
        for rows, phi in self:
            out[rows] = phi @ m
            sqnorm[rows] = phi.square().sum(1, dtype=torch.float64)
        return out, sqnorm

    def transpose_times(self, q: torch.Tensor) -> torch.Tensor:
        """``Phi^T @ q`` (P x width) in one pass."""
        out = torch.zeros(self.dim, q.shape[1], dtype=torch.float32, device=self.device)
        for rows, phi in self:
            out.addmm_(phi.T, q[rows])
        return out


def fit_normalizer(rows: GradientRows, kernel: str) -> KernelNormalizer:
    """NFK: mean and ``w = d^(-1/2)`` from one float64 pass over the kernel set (moments merged on the device,
    then :meth:`KernelNormalizer.fit_moments`); NTK: raw gradients, no pass."""
    normalizer = KernelNormalizer(kernel)
    if kernel == "ntk":
        normalizer.shift_, normalizer.scale_ = np.zeros(rows.dim), np.ones(rows.dim)
        return normalizer
    moments = None
    for _, g in rows:
        moments = add_block_moments(moments, g.double())
    if moments is not None:
        n, mean, m2 = moments
        moments = (n, mean.cpu().numpy(), m2.cpu().numpy())
    return normalizer.fit_moments(moments)


def _orthonormal(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(a)[0]


def omega_matrix(seed: int, rows: int, width: int, device: torch.device) -> torch.Tensor:
    """The seeded Gaussian test matrix (rows x width), assembled from :func:`omega_block` blocks."""
    return torch.cat([
        omega_block(seed, b, min(BLOCK_ROWS, rows - start), width, device)
        for b, start in enumerate(range(0, rows, BLOCK_ROWS))
    ])


def randomized_pca(
    rows: GradientRows, k: int, oversample: int, power_iters: int, seed: int
) -> tuple[torch.Tensor, np.ndarray, float]:
    """Top-``k`` right singular vectors of ``Phi`` (rows already normalised): ``(V (P x k) on the device,
    singular values, ||Phi||_F^2)``; ``2 * power_iters + 2`` passes."""
    width = min(k + oversample, rows.n_rows, rows.dim)
    if k > width:
        raise GradientError(f"subspace.k={k} exceeds min(N={rows.n_rows}, P={rows.dim})")
    omega = omega_matrix(seed, rows.dim, width, rows.device)
    y, sqnorm = rows.times_with_sqnorm(omega)  # first pass also measures ||Phi||_F^2
    total_sq = float(sqnorm.sum())
    del omega
    for it in range(power_iters):
        y = rows.times(_orthonormal(rows.transpose_times(_orthonormal(y))))
        log.info("exact randomized PCA: power iteration %d/%d done", it + 1, power_iters)
    z = rows.transpose_times(_orthonormal(y))  # Phi^T Q = B^T, P x width
    qz, r = torch.linalg.qr(z)
    w, s, _ = torch.linalg.svd(r.double())  # B^T = Qz R = (Qz W) S U^T: B's right singular vectors are Qz W
    v = qz @ w[:, :k].to(qz.dtype)
    signs = torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
    signs[signs == 0] = 1.0
    return v * signs, s[:k].cpu().numpy(), total_sq


def read_components(arr: zarr.Array, device: torch.device) -> torch.Tensor:
    """Stream ``V`` from its zarr chunks into one device tensor."""
    v = torch.empty(arr.shape, dtype=torch.float32, device=device)
    step = arr.chunks[0]
    for start in range(0, arr.shape[0], step):
        v[start : start + step] = torch.from_numpy(arr[start : start + step]).to(device)
    return v


def _normalise(rows: GradientRows, shift: np.ndarray, scale: np.ndarray, kernel: str) -> None:
    """Make ``rows`` yield ``(g - shift) * scale`` (NTK: raw gradients)."""
    if kernel == "nfk":
        rows.scale = torch.as_tensor(scale, dtype=torch.float32, device=rows.device)
        rows.offset = torch.as_tensor(shift * scale, dtype=torch.float32, device=rows.device)


def fit_exact_randomized(
    rows: GradientRows, kernel: str, k: int, oversample: int, power_iters: int, seed: int
) -> GradientSubspace:
    """The exact NFK/NTK PCA of the kernel set's gradients, as a :class:`GradientSubspace` whose
    ``components_`` is a device tensor (``save`` writes it as chunked zarr)."""
    log.info("matrix-free PCA of %d x %d exact gradients: %d passes", rows.n_rows, rows.dim, 2 * power_iters + 3)
    sub = GradientSubspace(kernel=kernel, basis="pca", method="exact_randomized", k=k, oversample=oversample,
                           power_iters=power_iters, seed=seed)
    sub.normalizer_ = fit_normalizer(rows, kernel)
    _normalise(rows, sub.normalizer_.shift_, sub.normalizer_.scale_, kernel)
    sub.components_, sub.singular_values_, sub.total_sq_ = randomized_pca(rows, k, oversample, power_iters, seed)
    sub.explained_variance_ratio_ = sub.singular_values_**2 / max(sub.total_sq_, 1e-300)
    return sub


def transform_rows(sub: GradientSubspace, rows: GradientRows) -> tuple[np.ndarray, np.ndarray]:
    """``(G_low = phi(g) @ V (N x k), ||phi||^2 per row)`` in one pass; ``V`` streamed from its zarr chunks
    onto the device."""
    _normalise(rows, sub.normalizer_.shift_, sub.normalizer_.scale_, sub.kernel)
    v = read_components(sub.components_, rows.device) if hasattr(sub.components_, "chunks") else \
        torch.as_tensor(sub.components_, dtype=torch.float32, device=rows.device)
    g_low, sqnorm = rows.times_with_sqnorm(v)
    return g_low.cpu().numpy(), sqnorm.cpu().numpy()
