"""Train a classifier on the ID training set (used when no checkpoint is configured).

The recipe is ``train`` in params.yaml: SGD with momentum, optionally wrapped by SAM (sharpness-aware minimisation,
Foret et al. 2021; adaptive: Kwon et al. 2021), cross-entropy with optional label smoothing, a learning-rate
schedule and an augmentation. The defaults are the embedded default's recipe; the authors' (SAM rho = 0.05, label
smoothing, step schedule, crop + flip) is ``configs/cifar10_resnet18_authors.yaml``.

Training resumes: after every epoch the model, optimiser, schedule and random states are written to
``models/trained.resume.pt`` (atomically) with a fingerprint of what they belong to (the recipe, the model, the
seed, the training images); a run that finds a matching file continues after its last finished epoch and ends
with the same weights as a run never interrupted (same device and thread count). The file is removed once the
model is saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lowgrad.config import Params, TrainConfig
from lowgrad.data import ImageSet, to_tensor_batch
from lowgrad.errors import GradientError
from lowgrad.networks import FeatureClassifier
from lowgrad.paths import TRAIN_RESUME, atomic_path

log = logging.getLogger(__name__)

STEP_MILESTONES = (0.3, 0.6, 0.8)  # "step": the learning rate times STEP_FACTOR after 30 %, 60 % and 80 % of the epochs
STEP_FACTOR = 0.2  # (the schedule of the SAM authors' CIFAR example, which the paper's authors trained with)


def train_loss(logits: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Mean cross-entropy with ``cfg.label_smoothing`` (torch's convention: the target puts ``1 - s + s / C`` on the
    true class and ``s / C`` on each other class)."""
    return F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)


@contextlib.contextmanager
def frozen_batchnorm_statistics(model: torch.nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise by the batch as usual but leave their running statistics alone (momentum 0):
    SAM's second forward pass, at the perturbed weights, must not count the batch twice."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:  # the batch count too: a cumulative average (momentum None) weighs each batch by it
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def sam_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_at: Callable[[], torch.Tensor],
             rho: float, adaptive: bool = False) -> torch.Tensor:
    """One SAM step: the gradient ``g`` at ``w``, the ascent ``e = rho g / ||g||`` (adaptive: ``e = rho w^2 g /
    ||w g||``, element-wise), the gradient at ``w + e``, then the base optimiser's step from ``w`` with that
    gradient. Returns the loss at ``w``."""
    loss = loss_at()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        scaled = [(p.abs() * p.grad) if adaptive else p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        originals = [p.detach().clone() for p in params]
        for p, s in zip(params, scaled):
            p.add_((p.abs() * s if adaptive else s) * (rho / (norm + 1e-12)))
    with frozen_batchnorm_statistics(model):
        perturbed = loss_at()
    optimizer.zero_grad(set_to_none=True)
    perturbed.backward()
    with torch.no_grad():
        for p, w in zip(params, originals):
            p.copy_(w)
    optimizer.step()
    return loss


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """The per-step learning-rate schedule ``cfg.schedule`` over ``cfg.epochs`` epochs."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.schedule == "step":
        def factor(step: int) -> float:
            epoch = step // steps_per_epoch
            return STEP_FACTOR ** sum(epoch >= m * cfg.epochs for m in STEP_MILESTONES)  # as the SAM example's StepLR
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # constant


def train_classifier(model: FeatureClassifier, train: ImageSet, params: Params, device: torch.device,
                     on_epoch_end: Callable[[int], None] | None = None) -> FeatureClassifier:
    """Train ``model`` on ``train`` with the recipe ``params.train``, seeded, resuming from
    :data:`~lowgrad.paths.TRAIN_RESUME` when it belongs to this run. ``on_epoch_end(epoch)`` is called after each
    epoch's state is saved (a test stops a run there)."""
    cfg, data = params.train, params.data
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.nesterov)
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    sched = make_schedule(opt, cfg, steps_per_epoch)
    x_all = to_tensor_batch(train.images, data.mean, data.std)
    y_all = torch.from_numpy(train.labels)
    pad = max(1, data.image_size // 8)
    fingerprint = _fingerprint(params, train)
    start = _resume(model, opt, sched, rng, fingerprint, device)
    for epoch in tqdm(range(start, cfg.epochs), desc="train", unit="epoch", initial=start, total=cfg.epochs):
        order = rng.permutation(len(train))
        total = 0.0
        for first in range(0, len(order), cfg.batch_size):
            idx = torch.from_numpy(order[first : first + cfg.batch_size])
            x = _augment(x_all[idx], pad, rng, cfg.augment).to(device)
            y = y_all[idx].to(device)
            loss_at = lambda: train_loss(model(x), y, cfg)  # noqa: E731
            if cfg.sam_rho > 0:
                loss = sam_step(model, opt, loss_at, cfg.sam_rho, cfg.sam_adaptive)
            else:
                loss = loss_at()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if not torch.isfinite(loss):
                raise GradientError(f"training diverged: loss {float(loss)} at epoch {epoch + 1}, step "
                                    f"{first // cfg.batch_size + 1}; lower train.lr (now {cfg.lr})")
            sched.step()
            total += float(loss) * len(idx)
        log.info("epoch %d/%d: train loss %.4f", epoch + 1, cfg.epochs, total / len(train))
        _save_resume(model, opt, sched, rng, fingerprint, epoch + 1)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    return model.eval()


def finish_training() -> None:
    """The trained model is saved: its resume state is no longer needed."""
    Path(TRAIN_RESUME).unlink(missing_ok=True)


def _fingerprint(params: Params, train: ImageSet) -> str:
    """What a resume state belongs to: the recipe, the model, the seed, the normalisation and the training images."""
    what = {"train": params.train.model_dump(), "model": params.model.model_dump(mode="json"), "seed": params.seed,
            "data": params.data.model_dump(mode="json", include={"image_size", "channels", "mean", "std"})}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(train.images).tobytes())
    digest.update(np.ascontiguousarray(train.labels).tobytes())
    return digest.hexdigest()


def _save_resume(model, opt, sched, rng: np.random.Generator, fingerprint: str, epochs_done: int) -> None:
    state = {"fingerprint": fingerprint, "epochs_done": epochs_done, "model": model.state_dict(),
             "optimizer": opt.state_dict(), "schedule": sched.state_dict(), "numpy_rng": json.dumps(rng.bit_generator.state),
             "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    with atomic_path(TRAIN_RESUME) as tmp:
        torch.save(state, tmp)


def _resume(model, opt, sched, rng: np.random.Generator, fingerprint: str, device: torch.device) -> int:
    """Load a matching resume state; returns the epochs already done (0 without one)."""
    path = Path(TRAIN_RESUME)
    if not path.exists():
        return 0
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable state is started afresh, never trusted
        log.warning("%s is unreadable (%s): training starts afresh", path, exc)
        return 0
    if state.get("fingerprint") != fingerprint:
        log.warning("%s belongs to another recipe, model or training set: training starts afresh", path)
        return 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["schedule"])
    rng.bit_generator.state = json.loads(state["numpy_rng"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    log.info("resuming training after epoch %d (%s)", state["epochs_done"], path)
    return int(state["epochs_done"])


def _augment(x: torch.Tensor, pad: int, rng: np.random.Generator, kind: str) -> torch.Tensor:
    """``batch_shift``: the whole batch zero-padded by ``pad`` and cropped back at one random offset;
    ``crop_flip``: each image cropped at its own offset, then flipped left-right with probability 1/2 (the
    classic CIFAR augmentation, RandomCrop(padding) + RandomHorizontalFlip)."""
    if kind == "batch_shift":
        return _random_shift(x, pad, rng)
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))
    rows = torch.from_numpy(dy[:, None] + np.arange(h))[:, None, :, None]
    cols = torch.from_numpy(dx[:, None] + np.arange(w))[:, None, None, :]
    cropped = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    flip = torch.from_numpy(rng.random(n) < 0.5)[:, None, None, None]
    return torch.where(flip, cropped.flip(-1), cropped)


def _random_shift(x: torch.Tensor, pad: int, rng: np.random.Generator) -> torch.Tensor:
    """Zero-pad by ``pad`` and crop back at a random offset (the classic CIFAR augmentation)."""
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = rng.integers(0, 2 * pad + 1, size=2)
    h, w = x.shape[-2:]
    return padded[..., dy : dy + h, dx : dx + w]
