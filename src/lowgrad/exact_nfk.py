"""The exact-NFK sketch: a CountSketch of each layer's exactly normalised per-sample gradient, with its exact norm."""

from __future__ import annotations

import threading

import numpy as np
import torch

from lowgrad.countsketch import bucket_index, hash_rows, hash_rows_torch, run_length, warm_up
from lowgrad.errors import GradientError
from lowgrad.layer_capture import Layer, LayerCapture, bias_gradients, bn_normalised, exact_layer_gradients, layer_seed
from lowgrad.networks import FeatureClassifier


class ExactNFKSketch(LayerCapture):
    """A CountSketch (sparse Johnson-Lindenstrauss, Clarkson & Woodruff 2013) of the *exactly* normalised gradient.

    Per Conv2d / Linear layer the per-sample weight gradient ``G`` is formed (:func:`exact_layer_gradients`: the
    cost of a weight gradient, never the whole P-vector), normalised exactly, ``Phi = w * (G - z)`` with the kernel
    sample's ``w`` and ``z`` (:func:`fit_exact_nfk`), and hashed into ``dim`` shared coordinates: each parameter
    adds ``+-Phi_j`` to one seeded bucket, the buckets laid out in runs of consecutive coordinates
    (:mod:`lowgrad.countsketch`: ``O(P)`` per sample in one pass, the sign folded into ``w`` and ``z``). Inner
    products are unbiased with variance at most a dense Gaussian sketch's, and NFK rows, whose mass sits on few
    coordinates, are kept *better* than by a Gaussian or Kronecker projection (a Kronecker sketch of rank 16 keeps
    their Gram matrix only to a 0.93 correlation on ResNet-20). Biases and BatchNorm parameters are kept exact.
    ``||phi||^2`` is summed exactly from the same formed gradients (:meth:`__call__` returns it as a fourth output).
    Rows are final NFK rows: the subspace neither centres nor scales them again. Without ``normalisation`` (NTK):
    ``w = 1, z = 0``."""

    label = "the exact-NFK sketch"
    exact_sqnorm = True
    cpu_kernel = True  # hash CPU tensors with the one-pass kernel (False: the torch ops every device runs)
    max_block_floats = 2**25  # unfolded patches + weight gradients formed at once per layer (128 MB of float32)

    def __init__(self, model: FeatureClassifier, dim: int, seed: int,
                 normalisation: dict[str, dict[str, np.ndarray]] | None = None,
                 param_names: list[str] | None = None) -> None:
        super().__init__(model, param_names)
        self.seed = seed
        first = next(model.parameters())
        self.sketch_dim = dim
        self.normalisation: dict[str, dict[str, torch.Tensor]] = {}
        self.run = run_length(dim)  # weight coordinates hashed to consecutive buckets
        self.run_offsets: dict[str, torch.Tensor] = {}  # layer -> the seeded first bucket of each run
        self._bucket_index: dict[str, torch.Tensor] = {}  # layer -> each coordinate's bucket (off the CPU only)
        self.signs: dict[str, torch.Tensor] = {}  # layer -> the seeded sign of each weight coordinate (weight layout)
        self._blocks = threading.local()  # per thread: the block formed gradients are written in (:meth:`_block`)
        small = 0
        for layer in self.layers:
            parts = (normalisation or {}).get(layer.name, {})
            if normalisation is not None and not parts:
                raise GradientError(f"layer {layer.name}: no exact NFK normalisation in the factors (rerun the factors stage)")
            norm = {k: torch.as_tensor(v, dtype=first.dtype, device=first.device).reshape(self._shape(layer, k))
                    for k, v in parts.items()}
            for part in ("weight", "bias"):
                if f"{part}_w" in norm:  # phi = g * w - z * w: one in-place pass over the formed gradient
                    norm[f"{part}_shift"] = -norm.pop(f"{part}_z") * norm[f"{part}_w"]
            if layer.kind == "bn":
                self.normalisation[layer.name] = norm
                small += 2 * layer.module.num_features
                continue
            size = layer.module.weight.numel()
            gen = torch.Generator().manual_seed(layer_seed(seed, f"countsketch:{layer.name}"))
            self.run_offsets[layer.name] = torch.randint(0, dim, (-(-size // self.run),), generator=gen)
            sign = torch.randint(0, 2, (size,), generator=gen).to(first.dtype) * 2 - 1
            self.signs[layer.name] = sign.to(first.device).reshape(self._shape(layer, "weight"))
            # the hashed value is sign * w * (g - z) = g * (sign * w) - sign * z * w: the sign joins the scale
            norm["weight_w"] = self.signs[layer.name] * norm.get("weight_w", 1.0)
            if "weight_shift" in norm:
                norm["weight_shift"] = self.signs[layer.name] * norm["weight_shift"]
            self.normalisation[layer.name] = norm
            if layer.module.bias is not None:
                small += layer.module.weight.shape[0]
        self.dim = dim + small
        if first.device.type == "cpu" and self.cpu_kernel:
            warm_up(first.dtype)
        self.layout = [("countsketch", f"weights in runs of {self.run}", dim)] + [  # the store's meta: checked on reopen
            (layer.name, "bn" if layer.kind == "bn" else "bias", 2 * layer.module.num_features if layer.kind == "bn"
             else layer.module.weight.shape[0]) for layer in self.layers if layer.kind == "bn" or layer.module.bias is not None
        ]

    @staticmethod
    def _shape(layer: Layer, key: str) -> tuple[int, ...]:
        m = layer.module
        if key.startswith("bias") or layer.kind == "bn":
            return (-1,)
        return (m.weight.shape[0], int(np.prod(m.weight.shape[1:])))

    def _normalised(self, layer: Layer, part: str, g: torch.Tensor) -> torch.Tensor:
        """``w * (g - z)`` of a bias or BatchNorm parameter, computed in place in ``g`` (a freshly formed gradient);
        weight gradients are normalised, signed and hashed in one pass by :meth:`_hash`."""
        norm = self.normalisation[layer.name]
        if f"{part}_w" not in norm:
            return g
        if f"{part}_shift" not in norm:
            return g.mul_(norm[f"{part}_w"])
        return torch.addcmul(norm[f"{part}_shift"], g, norm[f"{part}_w"], out=g)  # one pass: g * w - z * w

    def buckets(self, layer_name: str) -> torch.Tensor:
        """The bucket of each weight coordinate of a layer (flat, in the ``(C_out, C_in*kh*kw)`` order of its formed
        gradient)."""
        offsets = self.run_offsets[layer_name]
        size = self.signs[layer_name].numel()
        return bucket_index(offsets, self.run, size, self.sketch_dim)

    def _block(self, need: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``need`` floats that the formed gradients are written in, kept across layers and calls and grown when a
        layer needs more: a fresh block per layer or call costs as much again in page faults as forming the gradient
        in it. One per thread, so threads never share it."""
        block = getattr(self._blocks, "block", None)
        if block is None or block.numel() < need or block.dtype != dtype or block.device != device:
            block = self._blocks.block = torch.empty(need, dtype=dtype, device=device)
        return block[:need]

    def _max_block(self, layer: Layer, batch: int, positions: int) -> int:
        """Samples of a layer whose patches and formed weight gradients fit in ``max_block_floats`` at once."""
        c_out, c_in = self._shape(layer, "weight")
        patch_floats = c_in * layer.module.groups * positions if layer.kind == "conv" else 0
        return min(batch, max(1, self.max_block_floats // (c_out * c_in + patch_floats)))

    def __call__(self, x: torch.Tensor):
        inputs, deltas, logits, features = self.capture(x)
        hashed = torch.zeros(len(x), self.sketch_dim, dtype=logits.dtype, device=x.device)
        exact_parts, sqnorm = [], torch.zeros(len(x), dtype=torch.float64, device=x.device)
        for layer in self.layers:
            sq, small = self._exact_layer(layer, inputs[layer.name], deltas[layer.name], hashed)
            sqnorm += sq
            if small is not None:
                exact_parts.append(small)
        out = torch.cat([hashed, *exact_parts], dim=1)
        if not (torch.isfinite(out).all() and torch.isfinite(sqnorm).all()):
            rows = torch.nonzero(~torch.isfinite(out).all(dim=1)).flatten()[:5].tolist()
            raise GradientError(f"non-finite gradient sketches for batch rows {rows} (check inputs and weights)")
        return out, logits, features, sqnorm

    def _hash(self, layer_name: str, formed: torch.Tensor, hashed: torch.Tensor) -> torch.Tensor:
        """Adds the signed, normalised rows ``sign * w * (formed - z)`` into ``hashed`` (their rows); returns their
        squared norms (float64). On the CPU one pass of :func:`lowgrad.countsketch.hash_rows`, elsewhere torch ops
        (``formed`` is overwritten there)."""
        norm = self.normalisation[layer_name]
        scale, shift = norm["weight_w"], norm.get("weight_shift")
        if formed.device.type == "cpu" and self.cpu_kernel:
            return hash_rows(formed, scale, shift, self.run_offsets[layer_name], self.run, hashed)
        if layer_name not in self._bucket_index:
            self._bucket_index[layer_name] = self.buckets(layer_name).to(formed.device)
        shift = None if shift is None else shift.reshape(-1)
        return hash_rows_torch(formed, scale.reshape(-1), shift, self._bucket_index[layer_name], hashed)

    def _exact_layer(self, layer: Layer, x: torch.Tensor, delta: torch.Tensor,
                     hashed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Adds the layer's hashed weight gradient to ``hashed`` (B x dim), formed in :meth:`_block`; returns its
        exact squared norm (B,) and its exact small parameters (B, n) or None."""
        m = layer.module
        if layer.kind == "bn":
            phi_w = self._normalised(layer, "weight", (delta * bn_normalised(m, x)).sum(dim=(2, 3)))
            phi_b = self._normalised(layer, "bias", delta.sum(dim=(2, 3)))
            small = torch.cat([phi_w, phi_b], dim=1)
            return (small.double() ** 2).sum(dim=1), small
        c_out, c_in = self._shape(layer, "weight")
        step = self._max_block(layer, len(x), delta[0].numel() // c_out)  # conv: positions, each a patch
        sq = []
        for i in range(0, len(x), step):  # bounded memory: `step` samples' patches and weight gradients at a time
            xs, ds = x[i : i + step], delta[i : i + step]
            out = self._block(len(xs) * c_out * c_in, ds.dtype, ds.device).view(len(xs), c_out, c_in)
            formed = exact_layer_gradients(layer.kind, m, xs, ds, out=out).view(len(xs), -1)
            sq.append(self._hash(layer.name, formed, hashed[i : i + step]))
        sqnorm = torch.cat(sq)
        if m.bias is None:
            return sqnorm, None
        phi_b = self._normalised(layer, "bias", bias_gradients(layer.kind, delta))
        return sqnorm + (phi_b.double() ** 2).sum(dim=1), phi_b
