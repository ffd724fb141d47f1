"""The matrix-free route's rows (``subspace.method: exact_randomized``): exact per-sample gradients recomputed
batch by batch on the device at every pass, never stored.

:class:`GradientRows` is a row-pass backend of :class:`lowgrad.subspace.GradientSubspace` (beside the local
zarr and Dask ones): the same ``moments`` / ``times`` / ``transpose_times`` passes, computed with torch on the
device, and :class:`TorchOps` the array operations of the randomized SVD there. So the paper's PCA of the NFK
rows ``phi_i = w * (g_i - mu)`` runs without storing any gradient: one float64 pass for ``mu`` and ``w``, one
for ``Phi Omega``, two per power iteration and one for ``Phi^T Q`` (``2 * power_iters + 3`` passes).

Memory: the P-side matrices (``Omega`` and ``Phi^T Q``, P x (k + oversample) float32) live on the device
(ResNet-18 at k + oversample = 250: 11.2 GB), plus one batch of gradients (batch x P float32; the moments
pass holds about three batch x P float64 temporaries: size ``gradient.batch_size`` to fit). The basis ``V``
(P x k) is written as a chunked zarr array and projections stream it back chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import zarr
from tqdm import tqdm

from lowgrad.data import to_tensor_batch
from lowgrad.dense_sketch import BLOCK_ROWS, omega_block
from lowgrad.errors import GradientError
from lowgrad.gradients import PerSampleGradients
from lowgrad.subspace import add_block_moments


def omega_matrix(seed: int, rows: int, width: int, device: torch.device) -> torch.Tensor:
    """The seeded Gaussian test matrix (rows x width), assembled from :func:`omega_block` blocks."""
    return torch.cat([
        omega_block(seed, b, min(BLOCK_ROWS, rows - start), width, device)
        for b, start in enumerate(range(0, rows, BLOCK_ROWS))
    ])


def read_components(arr: zarr.Array, device: torch.device) -> torch.Tensor:
    """Stream ``V`` from its zarr chunks into one device tensor."""
    v = torch.empty(arr.shape, dtype=torch.float32, device=device)
    step = arr.chunks[0]
    for start in range(0, arr.shape[0], step):
        v[start : start + step] = torch.from_numpy(arr[start : start + step]).to(device)
    return v


def fits_on(arr: zarr.Array, device: torch.device) -> bool:
    """Whether ``V`` (float32) may live whole on ``device`` (:data:`lowgrad.memory.SHARE` of its memory)."""
    from lowgrad.memory import SHARE, device_memory

    return 4 * arr.shape[0] * arr.shape[1] <= SHARE * device_memory(device)


def resident_components(arr: zarr.Array, device: torch.device) -> torch.Tensor | zarr.Array:
    """``V`` read once onto ``device`` where it fits, for a caller that projects many batches (the saved detector);
    otherwise the zarr array, which every pass streams chunk by chunk."""
    return read_components(arr, device) if fits_on(arr, device) else arr


def _streamed_times(phi: torch.Tensor, arr: zarr.Array) -> torch.Tensor:
    """``phi @ V`` with ``V`` read chunk by chunk from its zarr array (a ``V`` too large for the device)."""
    out = torch.zeros(phi.shape[0], arr.shape[1], dtype=torch.float32, device=phi.device)
    step = arr.chunks[0]
    for start in range(0, arr.shape[0], step):
        out.addmm_(phi[:, start : start + step], torch.from_numpy(arr[start : start + step]).to(phi.device))
    return out


QR_BLOCK_ROWS = 1 << 18  # rows of a tall matrix per float64 block of the Gram and the triangular solve


def blocked_gram(a: torch.Tensor, block_rows: int = QR_BLOCK_ROWS) -> torch.Tensor:
    """``a.T @ a`` in float64, summed over blocks of ``block_rows`` rows (one block's float64 copy at a time)."""
    gram = torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[0], block_rows):
        block = a[start : start + block_rows].double()
        gram += block.T @ block
    return gram


def tall_qr(a: torch.Tensor, block_rows: int = QR_BLOCK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q, R`` of a tall ``m x w`` matrix by CholeskyQR2 (Fukaya, Nakatsukasa, Yanagisawa and Yamamoto 2014):
    twice, the ``w x w`` Gram matrix summed in float64 over blocks of ``block_rows`` rows, its Cholesky factor,
    and the rows times its inverse (a triangular solve per block), in place. No factorisation ever sees the whole
    matrix, so nothing indexes past 2^31 elements (CUDA's QR of a P x 220 matrix for ResNet-18 asks for an absurd
    workspace, pytorch issue 134326) and the extra memory is one block. ``a`` is overwritten by ``Q``. Accurate
    while ``a``'s condition number is below about 1e7 (the Gram squares it; float32 storage keeps an input's
    condition near that, and the randomized SVD orthonormalises after every pass). Columns that are linearly
    dependent (a Gram that is not positive definite) are a :class:`GradientError`: fewer independent rows than
    columns."""
    m, w = a.shape
    r_total = torch.eye(w, dtype=torch.float64, device=a.device)
    for _ in range(2):
        r, info = torch.linalg.cholesky_ex(blocked_gram(a, block_rows), upper=True)
        if int(info) != 0:
            raise GradientError(f"the randomized SVD's {w} columns are linearly dependent (the Cholesky factor of their "
                                f"Gram matrix breaks down at column {int(info)}): the rows span fewer dimensions than "
                                "subspace.k + subspace.oversample; lower them or add images")
        for start in range(0, m, block_rows):
            block = a[start : start + block_rows].double()
            a[start : start + block_rows] = torch.linalg.solve_triangular(r, block, upper=True, left=False).to(a.dtype)
        r_total = r @ r_total
    return a, r_total.to(a.dtype)


@dataclass(frozen=True)
class TorchOps:
    """The randomized SVD's array operations on the device (see :class:`lowgrad.subspace.NumpyOps`)."""

    device: torch.device

    def gaussian(self, seed: int, dim: int, width: int) -> torch.Tensor:
        return omega_matrix(seed, dim, width, self.device)

    @staticmethod
    def orthonormal(a: torch.Tensor) -> torch.Tensor:
        return tall_qr(a)[0]

    @staticmethod
    def top_right_vectors(bt: torch.Tensor, k: int) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
        """From ``B^T = Phi^T Q`` (P x width): ``B^T = Qz R = (Qz W) S U^T``, so ``B``'s right singular vectors
        are ``Qz W`` (only the small ``R`` is decomposed, in float64); the third value is ``U[:, :k]``, whose
        column ``j`` times ``Q`` is the kernel rows' scores on ``V``'s column ``j`` over ``s_j`` (as in
        :meth:`lowgrad.subspace.NumpyOps.top_right_vectors`)."""
        qz, r = tall_qr(bt)
        w, s, ut = torch.linalg.svd(r.double())
        return qz @ w[:, :k].to(qz.dtype), s[:k].cpu().numpy(), ut[:k].T.to(qz.dtype)


@dataclass(frozen=True)
class GradientRows:
    """The rows ``phi_i = (g_i - shift) * scale`` of one image set, recomputed batch by batch, never stored."""

    gradients: PerSampleGradients
    images: np.ndarray | None  # None: a saved detector's source, given each call's images (dataclasses.replace)
    mean: list[float]
    std: list[float]
    batch_size: int
    desc: str = "gradients"
    scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None  # shift * scale, so a row is g * scale - offset

    @property
    def device(self) -> torch.device:
        return next(iter(self.gradients.params.values())).device

    @property
    def n_rows(self) -> int:
        return len(self.images)

    @property
    def dim(self) -> int:
        return self.gradients.dim

    @property
    def ops(self) -> TorchOps:
        return TorchOps(self.device)

    def normalised(self, shift: np.ndarray, scale: np.ndarray) -> "GradientRows":
        """The same rows as ``(g - shift) * scale`` (raw gradients when ``shift = 0`` and ``scale = 1``)."""
        if not shift.any() and (scale == 1).all():
            return replace(self, scale=None, offset=None)
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=self.device)  # noqa: E731
        return replace(self, scale=as_tensor(scale), offset=as_tensor(shift * scale))

    def __iter__(self) -> Iterator[tuple[slice, torch.Tensor]]:
        for start in tqdm(range(0, self.n_rows, self.batch_size), desc=self.desc, unit="batch", leave=False):
            rows = slice(start, min(start + self.batch_size, self.n_rows))
            x = to_tensor_batch(self.images[rows], self.mean, self.std).to(self.device)
            g = self.gradients(x)[0]  # raises on non-finite gradients
            if self.scale is not None:
                g = g * self.scale - self.offset
            yield rows, g

    def _device_array(self, arg: Any) -> torch.Tensor:
        if isinstance(arg, torch.Tensor):
            return arg
        if hasattr(arg, "chunks"):  # the stored basis, streamed from zarr
            return read_components(arg, self.device)
        return torch.as_tensor(np.asarray(arg), dtype=torch.float32, device=self.device)

    def run(self, kind: str, arg: Any = None):
        """One pass, as :meth:`lowgrad.subspace.RowPasses.run`: ``moments`` (float64 NumPy ``(n, mean, M2)``),
        ``times`` (``Phi @ arg`` and each row's float64 squared norm, device tensors) or ``transpose_times``
        (``Phi^T @ arg``, a device tensor)."""
        if kind == "moments":
            acc = None
            for _, phi in self:
                acc = add_block_moments(acc, phi)
            return None if acc is None else (acc[0], acc[1].cpu().numpy(), acc[2].cpu().numpy())
        if kind == "times":
            streamed = hasattr(arg, "chunks") and not fits_on(arg, self.device)  # V too large: read per batch
            m = arg if streamed else self._device_array(arg)
            out = torch.empty(self.n_rows, m.shape[1], dtype=torch.float32, device=self.device)
            sqnorm = torch.empty(self.n_rows, dtype=torch.float64, device=self.device)
            for rows, phi in self:
                out[rows] = _streamed_times(phi, m) if streamed else phi @ m
                sqnorm[rows] = phi.square().sum(1, dtype=torch.float64)
            return out, sqnorm
        m = self._device_array(arg)
        if kind == "transpose_times":
            out = torch.zeros(self.dim, m.shape[1], dtype=torch.float32, device=self.device)
            for rows, phi in self:
                out.addmm_(phi.T, m[rows])
            return out
        raise ValueError(f"unknown pass kind {kind!r}")


def exact_rows(params, model: torch.nn.Module, images: np.ndarray | None, desc: str = "rows") -> GradientRows:
    """The matrix-free route's exact gradient rows of ``images`` (uint8 N x H x W x C; None: set later, per call)
    through ``model``, moved to the configured device, recomputed on every pass (``params``: a
    :class:`lowgrad.config.Params`)."""
    from lowgrad.gradients import select_parameters
    from lowgrad.models import pick_device
    from lowgrad.route import Route

    device = pick_device(params.device)
    model = model.to(device)
    gradients = PerSampleGradients(model, select_parameters(model, params.gradient.params))
    batch_size = Route.from_params(params).batch_size(params, gradients.dim, device)
    return GradientRows(gradients, images, params.data.mean, params.data.std, batch_size, desc=desc)
