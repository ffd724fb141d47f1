"""Structured (Kronecker) sketches of per-sample gradients that never form the full gradient (LoGra,
arXiv 2405.13954), with the NFK scale applied inside the sketch through a rank-1 Kronecker factor.

For a Conv2d / Linear weight the per-sample gradient is ``G = sum_t delta_t x_t^T`` (output gradients times
input patches). With seeded Gaussian ``P_out`` (r_out x C_out) and ``P_in`` (r_in x C_in*kh*kw), entries
N(0, 1/r), the layer's sketch is ``P_out G P_in^T = sum_t (P_out delta_t)(P_in x_t)^T``: both factors are
projected *before* the product (for a conv, ``P_in x_t`` is itself a convolution with ``P_in`` as kernel),
so a layer costs one extra small conv and a batched ``r_out x T x r_in`` product. A grouped (depthwise)
convolution's gradient is the stack of its groups' ``sum_t delta_jt x_jt^T``, sketched group by group with the
same ``P_in``; a Linear layer on tokens sums over its tokens as a conv over positions. Inner products are
preserved in expectation: ``E <sketch(G1), sketch(G2)> = <G1, G2>``.

NFK: ``phi = w * (g - z)``. Per layer, ``w`` (C_out x C_in*kh*kw) is replaced by its best rank-1
approximation ``a b^T`` (:func:`lowgrad.nfk_factors.fit_kronecker_nfk`); since ``(a b^T) * (delta x^T) = (a *
delta)(b * x)^T``, the factors fold into the projections (``P_out diag(a)``, ``P_in diag(b)``). Centring is
linear and happens later, in sketch space. Small parameter groups (BatchNorm affine parameters, biases) are kept
exact, scaled by their exact ``w``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from lowgrad.errors import GradientError
from lowgrad.layer_capture import Layer, LayerCapture, bn_normalised, layer_seed
from lowgrad.networks import FeatureClassifier


@dataclass
class KroneckerLayer(Layer):
    p_out: torch.Tensor | None = None  # (r_out, C_out), NFK factor folded in
    p_in: torch.Tensor | None = None  # (r_in, C_in*kh*kw), NFK factor folded in
    exact_scale: dict[str, torch.Tensor] = field(default_factory=dict)  # bias / BN parameter -> exact w


class KroneckerSketch(LayerCapture):
    """Callable ``x -> (sketch (B, D), logits (B, C), features (B, F))`` for a model in eval mode."""

    label = "the Kronecker sketch"

    def __init__(
        self,
        model: FeatureClassifier,
        rank: int,
        seed: int,
        factors: dict[str, dict[str, np.ndarray]] | None = None,
        param_names: list[str] | None = None,
    ) -> None:
        """``factors``: :func:`lowgrad.nfk_factors.fit_kronecker_nfk`'s (None: the NTK, unit scales);
        ``param_names`` as :class:`lowgrad.layer_capture.LayerCapture` takes them."""
        super().__init__(model, param_names)
        self.rank, self.seed = rank, seed
        device = next(model.parameters()).device
        self.layers: list[KroneckerLayer] = [self._projected(layer, (factors or {}).get(layer.name, {}), device)
                                             for layer in self.layers]
        self.dim = sum(self._layer_dim(layer) for layer in self.layers)
        self.layout = [(layer.name, layer.kind, self._layer_dim(layer)) for layer in self.layers]

    def _projected(self, layer: Layer, f: dict[str, np.ndarray], device: torch.device) -> KroneckerLayer:
        """The layer with its seeded projections (the NFK factors ``f`` folded in) or its exact scales."""
        module = layer.module
        if layer.kind == "bn":
            c = module.num_features
            return KroneckerLayer(layer.name, module, "bn", exact_scale={
                "weight": torch.as_tensor(f.get("weight", np.ones(c)), dtype=torch.float32).to(device),
                "bias": torch.as_tensor(f.get("bias", np.ones(c)), dtype=torch.float32).to(device),
            })
        c_out = module.weight.shape[0]
        c_in = int(np.prod(module.weight.shape[1:]))
        gen = torch.Generator().manual_seed(layer_seed(self.seed, layer.name))
        r_out, r_in = min(self.rank, c_out), min(self.rank, c_in)
        p_out = torch.randn(r_out, c_out, generator=gen) / np.sqrt(r_out)
        p_in = torch.randn(r_in, c_in, generator=gen) / np.sqrt(r_in)
        if "a" in f:
            p_out = p_out * torch.as_tensor(f["a"], dtype=torch.float32)[None, :]
            p_in = p_in * torch.as_tensor(f["b"], dtype=torch.float32)[None, :]
        projected = KroneckerLayer(layer.name, module, layer.kind, p_out.to(device), p_in.to(device))
        if module.bias is not None:
            projected.exact_scale["bias"] = torch.as_tensor(f.get("bias", np.ones(c_out)), dtype=torch.float32).to(device)
        return projected

    @staticmethod
    def _layer_dim(layer: KroneckerLayer) -> int:
        if layer.kind == "bn":
            return 2 * layer.module.num_features
        dim = layer.p_out.shape[0] * layer.p_in.shape[0]
        return dim + (layer.module.weight.shape[0] if layer.module.bias is not None else 0)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs, deltas, logits, features = self.capture(x)
        parts = [self._sketch_layer(layer, inputs[layer.name], deltas[layer.name]) for layer in self.layers]
        out = torch.cat(parts, dim=1)
        if not torch.isfinite(out).all():
            rows = torch.nonzero(~torch.isfinite(out).all(dim=1)).flatten()[:5].tolist()
            raise GradientError(f"non-finite gradient sketches for batch rows {rows} (check inputs and weights)")
        return out, logits, features

    def _sketch_layer(self, layer: KroneckerLayer, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        m = layer.module
        if layer.kind == "bn":
            x_hat = bn_normalised(m, x)
            g_w = (delta * x_hat).sum(dim=(2, 3)) * layer.exact_scale["weight"]
            g_b = delta.sum(dim=(2, 3)) * layer.exact_scale["bias"]
            return torch.cat([g_w, g_b], dim=1)
        groups = m.groups if layer.kind == "conv" else 1
        if layer.kind == "conv":
            # P_in x_t for every patch: a conv with P_in as kernel (a grouped conv: each group's patches through P_in)
            kernel = layer.p_in.view(-1, *m.weight.shape[1:]).repeat(groups, 1, 1, 1)
            px = F.conv2d(x, kernel, stride=m.stride, padding=m.padding, dilation=m.dilation, groups=groups).flatten(2)
            d = delta.flatten(2)  # (B, C_out, T); px: (B, groups * r_in, T)
        else:  # a Linear layer on (B, C_in) or on tokens (B, ..., C_in): the tokens are summed over like positions
            px = (x.reshape(b, -1, x.shape[-1]) @ layer.p_in.T).transpose(1, 2)  # (B, r_in, T)
            d = delta.reshape(b, -1, delta.shape[-1]).transpose(1, 2)  # (B, C_out, T)
        if groups == 1:
            pd = torch.einsum("oc,bct->bot", layer.p_out, d)
            block = torch.bmm(pd, px.transpose(1, 2)).reshape(b, -1)
        else:  # G = [G_1; ...; G_g] by output rows, G_j = sum_t delta_jt x_jt^T: P_out G P_in^T = sum_j P_out_j G_j P_in^T
            t = d.shape[2]
            p_out = layer.p_out.view(layer.p_out.shape[0], groups, -1)  # (r_out, groups, C_out / groups)
            pd = torch.einsum("ogc,bgct->bgot", p_out, d.view(b, groups, -1, t))
            block = torch.einsum("bgot,bgit->boi", pd, px.view(b, groups, -1, t)).reshape(b, -1)
        if m.bias is not None:
            return torch.cat([block, d.sum(dim=2) * layer.exact_scale["bias"]], dim=1)
        return block
