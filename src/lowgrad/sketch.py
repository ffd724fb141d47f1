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
approximation ``a b^T`` (estimated from exact per-layer gradients of a kernel sample, one layer at a time);
since ``(a b^T) * (delta x^T) = (a * delta)(b * x)^T``, the factors fold into the projections
(``P_out diag(a)``, ``P_in diag(b)``). Centring is linear and happens later, in sketch space. Small parameter
groups (BatchNorm affine parameters, biases) are kept exact, scaled by their exact ``w``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowgrad.countsketch import bucket_index, hash_rows, hash_rows_torch, run_length, warm_up
from lowgrad.errors import GradientError
from lowgrad.networks import FeatureClassifier
from lowgrad.subspace import add_block_moments, nfk_scale

log = logging.getLogger(__name__)


def _bn_normalised(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm2d input normalised with the running statistics (before the affine step)."""
    return (x - module.running_mean[None, :, None, None]) / torch.sqrt(module.running_var[None, :, None, None] + module.eps)


def _layer_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little")


@dataclass
class _Layer:
    name: str
    module: nn.Module
    kind: str  # conv | linear | bn
    p_out: torch.Tensor | None = None  # (r_out, C_out), NFK factor folded in
    p_in: torch.Tensor | None = None  # (r_in, C_in*kh*kw), NFK factor folded in
    exact_scale: dict[str, torch.Tensor] = field(default_factory=dict)  # bias / BN parameter -> exact w


class KroneckerSketch:
    """Callable ``x -> (sketch (B, D), logits (B, C), features (B, F))`` for a model in eval mode."""

    def __init__(
        self,
        model: FeatureClassifier,
        rank: int,
        seed: int,
        factors: dict[str, dict[str, np.ndarray]] | None = None,
        param_names: list[str] | None = None,
    ) -> None:
        """``param_names``: the selected parameters (:func:`lowgrad.gradients.select_parameters`); a layer is
        sketched, with all its parameters, when any of them is selected. ``None`` selects every layer."""
        self.model = model.eval()
        self.rank, self.seed = rank, seed
        self.layers: list[_Layer] = []
        factors = factors or {}
        device = next(model.parameters()).device
        selected = None if param_names is None else set(param_names)
        for name, module in model.named_modules():
            own = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
            if selected is not None and not selected.intersection(own):
                continue
            if type(module) in (nn.Conv2d, nn.Linear):  # exact types: a subclass may change forward (timm's StdConv2d)
                if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
                    raise GradientError(
                        f"layer {name}: a Conv2d with padding {module.padding!r} / padding_mode '{module.padding_mode}' "
                        "is not covered by the Kronecker sketch (it projects zero-padded patches); use a route that "
                        "differentiates any layer (gradient.sketch: none or dense, or subspace.method: exact_randomized)")
                c_out = module.weight.shape[0]
                c_in = int(np.prod(module.weight.shape[1:]))
                gen = torch.Generator().manual_seed(_layer_seed(seed, name))
                r_out, r_in = min(rank, c_out), min(rank, c_in)
                p_out = torch.randn(r_out, c_out, generator=gen) / np.sqrt(r_out)
                p_in = torch.randn(r_in, c_in, generator=gen) / np.sqrt(r_in)
                f = factors.get(name, {})
                if "a" in f:
                    p_out = p_out * torch.as_tensor(f["a"], dtype=torch.float32)[None, :]
                    p_in = p_in * torch.as_tensor(f["b"], dtype=torch.float32)[None, :]
                layer = _Layer(name, module, "conv" if isinstance(module, nn.Conv2d) else "linear", p_out.to(device), p_in.to(device))
                if module.bias is not None:
                    layer.exact_scale["bias"] = torch.as_tensor(f.get("bias", np.ones(c_out)), dtype=torch.float32).to(device)
                self.layers.append(layer)
            elif type(module) is nn.BatchNorm2d and module.affine:  # not timm's BatchNormAct2d (activation inside)
                f = factors.get(name, {})
                c = module.num_features
                self.layers.append(_Layer(name, module, "bn", exact_scale={
                    "weight": torch.as_tensor(f.get("weight", np.ones(c)), dtype=torch.float32).to(device),
                    "bias": torch.as_tensor(f.get("bias", np.ones(c)), dtype=torch.float32).to(device),
                }))
        if not self.layers:
            raise GradientError("the Kronecker sketch has no Conv2d / Linear / BatchNorm layer to sketch (gradient.params)")
        covered = {f"{layer.name}.{p}" for layer in self.layers for p in ("weight", "bias")}  # what _sketch_layer takes
        wanted = [n for n, _ in model.named_parameters()] if selected is None else sorted(selected)
        left_out = [n for n in wanted if n not in covered]
        if left_out:
            owners = [type(model.get_submodule(n.rpartition(".")[0])).__name__.removesuffix("WithHeadSplit")
                      for n in left_out]  # the model's own class, not the wrapper that splits off its head
            raise GradientError(
                f"the Kronecker sketch covers plain Conv2d (grouped too), Linear and BatchNorm2d layers only: {len(left_out)} "
                f"selected parameters would be left out (e.g. '{left_out[0]}' of a {owners[0]}; parameters of "
                f"{', '.join(sorted(set(owners)))}); use a route that "
                "differentiates any layer (gradient.sketch: none or dense, or subspace.method: exact_randomized), or "
                "leave them out with gradient.params")
        self.dim = sum(self._layer_dim(layer) for layer in self.layers)
        self.layout = [(layer.name, layer.kind, self._layer_dim(layer)) for layer in self.layers]

    @staticmethod
    def _layer_dim(layer: _Layer) -> int:
        if layer.kind == "bn":
            return 2 * layer.module.num_features
        dim = layer.p_out.shape[0] * layer.p_in.shape[0]
        return dim + (layer.module.weight.shape[0] if layer.module.bias is not None else 0)

    def capture(self, x: torch.Tensor):
        """Forward + one backward of ``sum_i logsumexp f(x_i)``: per-layer inputs and output gradients
        (per sample, since eval-mode layers never mix samples), plus logits and features."""
        inputs: dict[str, torch.Tensor] = {}
        versions: dict[str, int] = {}
        outputs: dict[str, torch.Tensor] = {}
        handles = []
        for layer in self.layers:
            def hook(mod, args, out, name=layer.name):
                if name in outputs:
                    raise GradientError(f"layer {name} runs more than once in a forward pass (a shared module): its "
                                        "gradient sums over the calls, which the sketch does not; use a route that "
                                        "differentiates any model (gradient.sketch: none or dense, or subspace.method: "
                                        "exact_randomized), or leave it out with gradient.params")
                inputs[name], versions[name] = args[0].detach(), args[0]._version
                outputs[name] = out
                # the model gets a copy: an in-place op after the layer (torchvision's ReLU(inplace=True), `out +=
                # identity`) would otherwise change the captured output, and its gradient would be the later op's
                return out.clone()
            handles.append(layer.module.register_forward_hook(hook))
        try:
            with torch.enable_grad():
                logits, features = self.model(x, return_features=True)
                score = torch.logsumexp(logits, dim=1).sum()
                names = list(outputs)
                grads = torch.autograd.grad(score, [outputs[n] for n in names])
        finally:
            for h in handles:
                h.remove()
        changed = [name for name, t in inputs.items() if t._version != versions[name]]
        if changed:
            raise GradientError(f"the input of layer {changed[0]} is modified in place after the layer read it, so its "
                                "gradient cannot be formed from it; use a route that differentiates any model "
                                "(gradient.sketch: none or dense, or subspace.method: exact_randomized)")
        silent = [layer.name for layer in self.layers if layer.name not in outputs]
        if silent:
            raise GradientError(f"layer {silent[0]} did not run in the forward pass (an auxiliary head?): leave it out "
                                "with gradient.params")
        deltas = dict(zip(names, (g.detach() for g in grads)))
        return inputs, deltas, logits.detach(), features.detach()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs, deltas, logits, features = self.capture(x)
        parts = [self._sketch_layer(layer, inputs[layer.name], deltas[layer.name]) for layer in self.layers]
        out = torch.cat(parts, dim=1)
        if not torch.isfinite(out).all():
            rows = torch.nonzero(~torch.isfinite(out).all(dim=1)).flatten()[:5].tolist()
            raise GradientError(f"non-finite gradient sketches for batch rows {rows} (check inputs and weights)")
        return out, logits, features

    def _sketch_layer(self, layer: _Layer, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        m = layer.module
        if layer.kind == "bn":
            x_hat = _bn_normalised(m, x)
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


def exact_layer_gradients(layer_kind: str, module: nn.Module, x: torch.Tensor, delta: torch.Tensor,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Exact per-sample weight gradients of one Conv2d (grouped too) / Linear (on tokens too) layer,
    ``(B, C_out, C_in/groups*kh*kw)``, the layout of its weight; written into ``out`` (that shape) when given."""
    b = x.shape[0]
    if layer_kind == "conv" and _forms_by_grouped_convolution(module, delta):
        return _grouped_conv_gradients(module, x, delta, out)
    if layer_kind == "conv":
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        d = delta.flatten(2)  # (B, C_out, T); patches: (B, C_in*kh*kw, T), channel-major, so a group is a block
        if module.groups == 1:
            return torch.bmm(d, patches.transpose(1, 2), out=out)
        g, t = module.groups, d.shape[2]
        per_group = torch.einsum("bgot,bgit->bgoi", d.view(b, g, -1, t), patches.view(b, g, -1, t))
        grads = per_group.reshape(b, module.weight.shape[0], -1)
    elif x.dim() == 2:
        return torch.mul(delta[:, :, None], x[:, None, :], out=out)
    else:  # tokens: sum over them, as over a convolution's positions
        tokens = delta.reshape(b, -1, delta.shape[-1]).transpose(1, 2)
        return torch.bmm(tokens, x.reshape(b, -1, x.shape[-1]), out=out)
    return grads if out is None else out.copy_(grads)


def _forms_by_grouped_convolution(module: nn.Module, delta: torch.Tensor) -> bool:
    """Whether a conv layer's per-sample weight gradients are cheaper as one grouped weight-gradient convolution
    over the batch than through unfolded patches: numeric padding and more output positions than output channels
    (the patches hold ``C_in*kh*kw`` values per position, the result ``C_out*C_in*kh*kw`` in all). Measured on
    ResNet-18 (CPU): 2-3x faster on layer1 / layer2, 2-3x slower on layer3 / layer4, where positions are few."""
    return not isinstance(module.padding, str) and delta[0, 0].numel() > delta.shape[1]


def _grouped_conv_gradients(module: nn.Module, x: torch.Tensor, delta: torch.Tensor,
                            out: torch.Tensor | None) -> torch.Tensor:
    """Per-sample weight gradients of a Conv2d as the weight gradient of one grouped convolution: the batch is
    folded into the channels (``1 x B*C_in`` input, ``1 x B*C_out`` output gradient, ``groups * B`` groups), so
    the weight gradient of group ``b`` is sample ``b``'s own, already in the weight's layout."""
    b, c_out = x.shape[0], delta.shape[1]
    size = (b * c_out, *module.weight.shape[1:])
    grads = torch.ops.aten.convolution_backward(
        delta.reshape(1, b * c_out, *delta.shape[2:]), x.reshape(1, -1, *x.shape[2:]),
        x.new_empty(1).expand(size), None, module.stride, module.padding, module.dilation, False, [0, 0],
        module.groups * b, [False, True, False])[1].view(b, c_out, -1)
    return grads if out is None else out.copy_(grads)


def bias_gradients(layer_kind: str, delta: torch.Tensor) -> torch.Tensor:
    """Exact per-sample bias gradients ``(B, C_out)`` of a Conv2d / Linear layer: the output gradient summed over
    positions (tokens)."""
    if layer_kind == "conv":
        return delta.flatten(2).sum(dim=2)
    return delta if delta.dim() == 2 else delta.reshape(delta.shape[0], -1, delta.shape[-1]).sum(dim=1)


def layer_gradient_moments(
    model: FeatureClassifier, batches, param_names: list[str] | None = None
) -> tuple[KroneckerSketch, dict[str, tuple]]:
    """Running ``(n, mean, M2)`` of the exact per-sample gradients of every sketchable parameter over ``batches``
    (an iterable of input tensors), keyed ``<layer>.weight`` / ``<layer>.bias``, accumulated layer by layer so that
    memory holds one layer's per-sample gradients of one batch."""
    sketch = KroneckerSketch(model, rank=1, seed=0, param_names=param_names)
    moments: dict[str, tuple] = {}

    def update(key: str, values: torch.Tensor) -> None:
        moments[key] = add_block_moments(moments.get(key), values.cpu())  # float64 moments, kept on the CPU

    for x in batches:
        if len(x) == 0:
            continue
        inputs, deltas, _, _ = sketch.capture(x)
        for layer in sketch.layers:
            xin, d = inputs[layer.name], deltas[layer.name]
            m = layer.module
            if layer.kind == "bn":
                update(f"{layer.name}.weight", (d * _bn_normalised(m, xin)).sum(dim=(2, 3)))
                update(f"{layer.name}.bias", d.sum(dim=(2, 3)))
                continue
            update(f"{layer.name}.weight", exact_layer_gradients(layer.kind, m, xin, d))
            if m.bias is not None:
                update(f"{layer.name}.bias", bias_gradients(layer.kind, d))
    if not moments:
        raise GradientError("no kernel samples to estimate the NFK factors from")
    return sketch, moments


def fit_kronecker_nfk(
    model: FeatureClassifier, batches, rank_one_iters: int = 100, param_names: list[str] | None = None
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """Estimate the NFK scale ``w = d^(-1/2)`` per parameter from exact per-sample gradients of a kernel
    sample (``batches``: an iterable of input tensors), and its best rank-1 approximation ``a b^T`` per
    Conv2d / Linear weight. Returns ``(factors, relative Frobenius error of a b^T per layer)``.
    ``param_names`` restricts the fit to the layers the sketch will use."""
    sketch, moments = layer_gradient_moments(model, batches, param_names)

    def scale(key: str, with_mask: bool = False):
        n, _, m2 = moments[key]
        w, pos = nfk_scale((m2 / n).numpy())
        return (w, pos) if with_mask else w

    factors: dict[str, dict[str, np.ndarray]] = {}
    errors: dict[str, float] = {}
    for layer in sketch.layers:
        if layer.kind == "bn":
            factors[layer.name] = {"weight": scale(f"{layer.name}.weight"), "bias": scale(f"{layer.name}.bias")}
            continue
        w, pos = scale(f"{layer.name}.weight", with_mask=True)
        w, pos = w.reshape(layer.module.weight.shape[0], -1), pos.reshape(layer.module.weight.shape[0], -1)
        a, b = rank_one_masked(w, pos, rank_one_iters)
        errors[layer.name] = float(np.linalg.norm((w - np.outer(a, b))[pos]) / np.linalg.norm(w[pos]))
        factors[layer.name] = {"a": a, "b": b}
        if layer.module.bias is not None:
            factors[layer.name]["bias"] = scale(f"{layer.name}.bias")
    return factors, errors


def fit_exact_nfk(
    model: FeatureClassifier, batches, param_names: list[str] | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """The exact NFK normalisation of every sketchable parameter from a kernel sample: per layer and parameter,
    the scale ``w = d^(-1/2)`` and the centre ``z`` (the mean gradient), as ``{layer: {"weight_w", "weight_z",
    "bias_w", "bias_z"}}`` (float32; Conv2d / Linear weights as ``C_out x C_in*kh*kw``)."""
    sketch, moments = layer_gradient_moments(model, batches, param_names)
    out: dict[str, dict[str, np.ndarray]] = {}
    for layer in sketch.layers:
        for part in ("weight", "bias"):
            key = f"{layer.name}.{part}"
            if key in moments:
                n, mean, m2 = moments[key]
                out.setdefault(layer.name, {})[f"{part}_w"] = nfk_scale((m2 / n).numpy())[0].astype(np.float32)
                out[layer.name][f"{part}_z"] = mean.numpy().astype(np.float32)
    return out


class ExactNFKSketch(KroneckerSketch):
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

    exact_sqnorm = True
    cpu_kernel = True  # hash CPU tensors with the one-pass kernel (False: the torch ops every device runs)
    max_block_floats = 2**25  # unfolded patches + weight gradients formed at once per layer (128 MB of float32)

    def __init__(self, model: FeatureClassifier, dim: int, seed: int,
                 normalisation: dict[str, dict[str, np.ndarray]] | None = None,
                 param_names: list[str] | None = None) -> None:
        super().__init__(model, rank=1, seed=seed, factors=None, param_names=param_names)
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
            gen = torch.Generator().manual_seed(_layer_seed(seed, f"countsketch:{layer.name}"))
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
    def _shape(layer: _Layer, key: str) -> tuple[int, ...]:
        m = layer.module
        if key.startswith("bias") or layer.kind == "bn":
            return (-1,)
        return (m.weight.shape[0], int(np.prod(m.weight.shape[1:])))

    def _normalised(self, layer: _Layer, part: str, g: torch.Tensor) -> torch.Tensor:
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

    def _max_block(self, layer: _Layer, batch: int, positions: int) -> int:
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

    def _exact_layer(self, layer: _Layer, x: torch.Tensor, delta: torch.Tensor,
                     hashed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Adds the layer's hashed weight gradient to ``hashed`` (B x dim), formed in :meth:`_block`; returns its
        exact squared norm (B,) and its exact small parameters (B, n) or None."""
        m = layer.module
        if layer.kind == "bn":
            phi_w = self._normalised(layer, "weight", (delta * _bn_normalised(m, x)).sum(dim=(2, 3)))
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


def _leading_singular_pair(t: np.ndarray, tol: float = 1e-12, max_iter: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """``(sqrt(s) u, sqrt(s) v)`` for the leading singular triple of a non-negative matrix, by power iteration
    (its singular vectors are one-signed Perron vectors, and a full SVD of a 2048 x 4608 layer costs seconds)."""
    v = np.full(t.shape[1], 1.0 / np.sqrt(t.shape[1]))
    s = 0.0
    for _ in range(max_iter):
        u = t @ v
        u /= max(np.linalg.norm(u), 1e-300)
        v_next = t.T @ u
        s = np.linalg.norm(v_next)
        v_next /= max(s, 1e-300)
        if np.linalg.norm(v_next - v) <= tol:
            v = v_next
            break
        v = v_next
    u = t @ v / max(s, 1e-300)
    return np.abs(u) * np.sqrt(s), np.abs(v) * np.sqrt(s)


def rank_one_masked(w: np.ndarray, mask: np.ndarray, iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-1 ``a b^T`` to the positive matrix ``w`` in least squares over the entries in ``mask``
    (alternating least squares from the leading singular pair). Entries outside the mask (zero-variance
    coordinates: constant on the kernel set, given the largest scale by the NFK rule) are left out of the fit,
    so they do not inflate the factor of every other coordinate of their row and column. ALS creeps at the end
    (on ResNet-50's widest layer the error moves in the fifth digit between 10 and 300 sweeps): 100 sweeps."""
    m = mask.astype(np.float64)
    target = np.where(mask, w, 0.0)
    a, b = _leading_singular_pair(target)
    if mask.all():
        return a, b
    for _ in range(iters):
        previous = a
        a = (target @ b) / np.maximum(m @ (b * b), 1e-300)
        b = (target.T @ a) / np.maximum(m.T @ (a * a), 1e-300)
        if np.linalg.norm(a - previous) <= 1e-8 * np.linalg.norm(a):
            break
    fallback_a, fallback_b = a[a > 0].mean() if (a > 0).any() else 1.0, b[b > 0].mean() if (b > 0).any() else 1.0
    return np.where(a > 0, a, fallback_a), np.where(b > 0, b, fallback_b)  # a fully masked row / column
