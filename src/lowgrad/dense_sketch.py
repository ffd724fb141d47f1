"""Dense Gaussian sketch of exact per-sample gradients: the faithful reference route (meant for GPUs).

Per batch, the exact per-sample gradients ``g`` (``torch.func``, B x P) are scaled element-wise by the exact
NFK ``w`` (no Kronecker approximation) and multiplied by a seeded Gaussian ``Omega`` (P x D, entries
N(0, 1/D)). ``Omega`` is generated on the fly in row blocks of ``BLOCK_ROWS`` from ``(seed, block index)`` and
never held whole (ResNet-18 at D = 15k would be 670 GB), so every batch regenerates it: the route costs
``P x D`` multiply-adds and random numbers per batch, which a GPU does in well under a second for ResNet-18
and a CPU only for small models. Centring is linear and happens later, in sketch space (``E <Omega^T a,
Omega^T b> = <a, b>``: inner products of NFK rows are preserved in expectation, with relative error about
``1/sqrt(D)``).

``Omega`` is drawn by the device's own generator (a CPU draw is far too slow for a GPU's batches), and CUDA's
``randn`` differs from the CPU's and between GPU models: the sketch's layout names where it was drawn
(:func:`omega_source`), so a store or a saved detector is never read against another ``Omega`` (the extract stage
starts a store afresh, ``project`` refuses sets drawn elsewhere, a saved detector refuses another device).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from lowgrad.gradients import PerSampleGradients
from lowgrad.networks import FeatureClassifier
from lowgrad.subspace import add_block_moments, nfk_scale

BLOCK_ROWS = 32768  # part of the sketch's definition: Omega's rows are seeded per block of this many


def _block_seed(seed: int, block: int) -> int:
    return int.from_bytes(hashlib.sha256(f"dense:{seed}:{block}".encode()).digest()[:8], "little") & (2**63 - 1)


def omega_source(device: torch.device | str) -> str:
    """Where ``Omega`` is drawn, as the sketch's layout records it: ``"cpu"``, or ``"cuda (<GPU model>)"``."""
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    return f"{device.type} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else device})"


def omega_block(seed: int, block: int, rows: int, dim: int, device: torch.device) -> torch.Tensor:
    """Rows ``[block * BLOCK_ROWS, block * BLOCK_ROWS + rows)`` of ``Omega`` (float32, N(0, 1/dim))."""
    gen = torch.Generator(device=device).manual_seed(_block_seed(seed, block))
    return torch.randn(rows, dim, generator=gen, device=device) / np.sqrt(dim)


class DenseSketch:
    """Callable ``x -> (w * g) Omega (B, D), logits (B, C), features (B, F)``."""

    def __init__(
        self, model: FeatureClassifier, param_names: list[str], dim: int, seed: int, scale: np.ndarray | None = None
    ) -> None:
        self.gradients = PerSampleGradients(model, param_names)
        self.dim, self.seed = dim, seed
        self.device = next(model.parameters()).device
        self.n_params = self.gradients.dim
        self.scale = None if scale is None else torch.as_tensor(scale, dtype=torch.float32, device=self.device)
        if self.scale is not None and self.scale.numel() != self.n_params:
            raise ValueError(f"NFK scale has {self.scale.numel()} entries for {self.n_params} gradient parameters")
        self.layout = {"dense_dim": dim, "block_rows": BLOCK_ROWS, "n_params": self.n_params,
                       "omega_drawn_on": omega_source(self.device)}

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g, logits, features = self.gradients(x)  # checks for non-finite gradients
        if self.scale is not None:
            g = g * self.scale
        out = torch.zeros(len(x), self.dim, dtype=torch.float32, device=g.device)
        for block, start in enumerate(range(0, self.n_params, BLOCK_ROWS)):
            stop = min(start + BLOCK_ROWS, self.n_params)
            out += g[:, start:stop] @ omega_block(self.seed, block, stop - start, self.dim, g.device)
        return out, logits, features


def fit_dense_nfk(model: FeatureClassifier, param_names: list[str], batches) -> np.ndarray:
    """Exact NFK scale ``w = d^(-1/2)`` per parameter (``d`` = variance of the per-sample gradients over the
    kernel batches; zero-variance coordinates take the largest finite scale). Memory: 3 x P doubles, on the device."""
    gradients = PerSampleGradients(model, param_names)
    moments = None
    for x in batches:
        if len(x) == 0:
            continue
        moments = add_block_moments(moments, gradients(x)[0])  # summed on the device (3 x P doubles)
    if moments is None:
        raise ValueError("no kernel samples to estimate the NFK scale from")
    n, _, m2 = moments
    return nfk_scale((m2 / n).cpu().numpy())[0]  # only the sums leave the device
