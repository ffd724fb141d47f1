"""Train a classifier on the ID training set (used when no checkpoint is configured)."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lowgrad.config import Params
from lowgrad.data import ImageSet, to_tensor_batch
from lowgrad.errors import GradientError
from lowgrad.models import FeatureClassifier

log = logging.getLogger(__name__)


def train_classifier(model: FeatureClassifier, train: ImageSet, params: Params, device: torch.device) -> FeatureClassifier:
    """SGD with momentum, cosine schedule and random-shift augmentation (1 pixel per 8), seeded."""
    cfg, data = params.train, params.data
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    x_all = to_tensor_batch(train.images, data.mean, data.std)
    y_all = torch.from_numpy(train.labels)
    pad = max(1, data.image_size // 8)
    for epoch in tqdm(range(cfg.epochs), desc="train", unit="epoch"):
        order = rng.permutation(len(train))
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            idx = torch.from_numpy(order[start : start + cfg.batch_size])
            x = _random_shift(x_all[idx], pad, rng).to(device)
            loss = F.cross_entropy(model(x), y_all[idx].to(device))
            if not torch.isfinite(loss):
                raise GradientError(f"training diverged: loss {float(loss)} at epoch {epoch + 1}, step "
                                    f"{start // cfg.batch_size + 1}; lower train.lr (now {cfg.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
        log.info("epoch %d/%d: train loss %.4f", epoch + 1, cfg.epochs, total / len(train))
    return model.eval()


def _random_shift(x: torch.Tensor, pad: int, rng: np.random.Generator) -> torch.Tensor:
    """Zero-pad by ``pad`` and crop back at a random offset (the classic CIFAR augmentation)."""
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = rng.integers(0, 2 * pad + 1, size=2)
    h, w = x.shape[-2:]
    return padded[..., dy : dy + h, dx : dx + w]
