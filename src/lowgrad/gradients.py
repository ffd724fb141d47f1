"""Exact per-sample gradients of ``s(x) = logsumexp_c f_c(x)`` with ``torch.func`` (docs/method.md section 1).

The model is in ``eval()`` mode (BatchNorm uses running statistics); one vectorised pass returns the
flattened per-sample gradients together with the logits and penultimate features.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from lowgrad.errors import ConfigError, GradientError
from lowgrad.networks import FeatureClassifier


def select_parameters(model: torch.nn.Module, spec: str | list[str]) -> list[str]:
    """Names of trainable parameters selected by ``"all"`` or a list of name prefixes (``["layer4", "fc"]``)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if spec == "all":
        return names
    chosen = []
    for prefix in spec:
        hits = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not hits:
            raise ConfigError(f"gradient.params: '{prefix}' matches no parameter (e.g. {names[:4]})")
        chosen.extend(h for h in hits if h not in chosen)
    return [n for n in names if n in chosen]  # model order, independent of the prefix order


def count_parameters(model: torch.nn.Module, names: list[str]) -> int:
    """How many scalars the named parameters of ``model`` hold (``P``, the width of a gradient row)."""
    named = dict(model.named_parameters())
    return sum(named[n].numel() for n in names)


class PerSampleGradients:
    """Callable ``x -> (grads (B, P), logits (B, C), features (B, F))`` for a fixed model and parameter set."""

    def __init__(self, model: FeatureClassifier, param_names: list[str]) -> None:
        self.model = model.eval()
        self.param_names = list(param_names)
        named = dict(model.named_parameters())
        self.params = {n: named[n].detach() for n in self.param_names}
        self.frozen = {n: p.detach() for n, p in named.items() if n not in self.params}
        self.frozen.update(dict(model.named_buffers()))
        self.dim = sum(p.numel() for p in self.params.values())

        def score(params: dict[str, torch.Tensor], x: torch.Tensor):
            logits, features = functional_call(
                self.model, (params, self.frozen), (x.unsqueeze(0),), {"return_features": True}
            )
            return torch.logsumexp(logits, dim=-1).squeeze(0), (logits.squeeze(0), features.squeeze(0))

        self._batched = vmap(grad(score, has_aux=True), in_dims=(None, 0))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grads, (logits, features) = self._batched(self.params, x)
        flat = torch.cat([grads[n].reshape(x.shape[0], -1) for n in self.param_names], dim=1)
        bad = ~torch.isfinite(flat).all(dim=1)
        if bad.any():
            rows = torch.nonzero(bad).flatten()[:5].tolist()
            raise GradientError(f"non-finite per-sample gradients for batch rows {rows} (check inputs and weights)")
        return flat, logits.detach(), features.detach()


def check_exact_route(n_params: int, max_params: int) -> None:
    """The exact route stores ``N x P`` floats: refuse models too large for it, naming the way out."""
    if n_params > max_params:
        raise GradientError(
            f"{n_params:,} gradient parameters selected, more than gradient.max_params={max_params:,} for the exact "
            "per-sample gradient store; restrict gradient.params to a subset of layers (e.g. ['layer4', 'fc']) "
            "or raise gradient.max_params if N x P floats fit on disk"
        )
