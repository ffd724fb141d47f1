"""The linear probe of docs/method.md section 5: BatchNorm1d(k) -> Linear(k, C) trained on the bank's ``G_low``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowgrad.detectors import Head
from lowgrad.options import ProbeConfig

DEFAULT = ProbeConfig()  # the option model's defaults are the signature's (one source)


def train_probe(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    epochs: int = DEFAULT.epochs,
    batch_size: int = DEFAULT.batch_size,
    lr: float = DEFAULT.lr,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
) -> Head:
    """Cross-entropy, plain SGD with momentum, no schedule (the authors' README setting); eval-mode head.

    The linear layer starts at zero (BatchNorm at its identity), so training is equivariant to flipping or
    permuting ``G_low``'s coordinates: the probe is a function of the subspace's geometry, not of how the PCA
    happened to orient its columns. From PyTorch's random start it was not, and the probe rows moved by up to
    2.5 AUROC points between two routes whose ``G_low`` agreed up to column signs."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.long)
    probe = nn.Sequential(nn.BatchNorm1d(x.shape[1]), nn.Linear(x.shape[1], num_classes))
    nn.init.zeros_(probe[1].weight)
    nn.init.zeros_(probe[1].bias)
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    probe.train()
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm cannot normalise a single sample
                continue
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    probe.eval()
    bn, linear = probe[0], probe[1]
    as_np = lambda t: t.detach().double().numpy().copy()  # noqa: E731
    return Head(
        weight=as_np(linear.weight), bias=as_np(linear.bias),
        bn_mean=as_np(bn.running_mean), bn_var=as_np(bn.running_var),
        bn_weight=as_np(bn.weight), bn_bias=as_np(bn.bias), bn_eps=bn.eps,
    )
