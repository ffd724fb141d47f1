"""The layers a layer-wise sketch reads and what it reads of them: the model's Conv2d (grouped too), Linear and
BatchNorm2d layers holding the selected parameters, their inputs and output gradients captured in one forward and
one backward pass of ``sum_i logsumexp f(x_i)`` (eval-mode layers never mix samples, so both are per sample), and
each layer's exact per-sample gradients formed from them. Shared by the Kronecker sketch
(:mod:`lowgrad.kronecker`), the exact-NFK sketch (:mod:`lowgrad.exact_nfk`) and their NFK factors
(:mod:`lowgrad.nfk_factors`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowgrad.errors import GradientError
from lowgrad.networks import FeatureClassifier


def bn_normalised(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm2d input normalised with the running statistics (before the affine step)."""
    return (x - module.running_mean[None, :, None, None]) / torch.sqrt(module.running_var[None, :, None, None] + module.eps)


def layer_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little")


@dataclass
class Layer:
    name: str
    module: nn.Module
    kind: str  # conv | linear | bn


class LayerCapture:
    """The layers of ``model`` a layer-wise sketch covers, and :meth:`capture` of their inputs and output gradients."""

    label = "the layer-wise sketch"  # what the errors call it (each sketch names itself)

    def __init__(self, model: FeatureClassifier, param_names: list[str] | None = None) -> None:
        """``param_names``: the selected parameters (:func:`lowgrad.gradients.select_parameters`); a layer is
        covered, with all its parameters, when any of them is selected. ``None`` selects every layer."""
        self.model = model.eval()
        self.layers: list[Layer] = []
        selected = None if param_names is None else set(param_names)
        for name, module in model.named_modules():
            own = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
            if selected is not None and not selected.intersection(own):
                continue
            if type(module) in (nn.Conv2d, nn.Linear):  # exact types: a subclass may change forward (timm's StdConv2d)
                if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
                    raise GradientError(
                        f"layer {name}: a Conv2d with padding {module.padding!r} / padding_mode '{module.padding_mode}' "
                        f"is not covered by {self.label} (it forms zero-padded patches); use a route that "
                        "differentiates any layer (gradient.sketch: none or dense, or subspace.method: exact_randomized)")
                self.layers.append(Layer(name, module, "conv" if isinstance(module, nn.Conv2d) else "linear"))
            elif type(module) is nn.BatchNorm2d and module.affine:  # not timm's BatchNormAct2d (activation inside)
                self.layers.append(Layer(name, module, "bn"))
        if not self.layers:
            raise GradientError(f"{self.label} has no Conv2d / Linear / BatchNorm layer to sketch (gradient.params)")
        covered = {f"{layer.name}.{p}" for layer in self.layers for p in ("weight", "bias")}  # what every layer-wise sketch takes
        wanted = [n for n, _ in model.named_parameters()] if selected is None else sorted(selected)
        left_out = [n for n in wanted if n not in covered]
        if left_out:
            owners = [type(model.get_submodule(n.rpartition(".")[0])).__name__.removesuffix("WithHeadSplit")
                      for n in left_out]  # the model's own class, not the wrapper that splits off its head
            raise GradientError(
                f"{self.label} covers plain Conv2d (grouped too), Linear and BatchNorm2d layers only: {len(left_out)} "
                f"selected parameters would be left out (e.g. '{left_out[0]}' of a {owners[0]}; parameters of "
                f"{', '.join(sorted(set(owners)))}); use a route that "
                "differentiates any layer (gradient.sketch: none or dense, or subspace.method: exact_randomized), or "
                "leave them out with gradient.params")

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
