"""The train stage's recipe: SAM against a step written out by hand (float64), label smoothing against torch's
and a hand-written loss, the schedules and augmentations against their definitions, and a killed training run
that resumes to the very weights of an uninterrupted one. Each with a negative control."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lowgrad.config import TrainConfig, parse_params
from lowgrad.train import _augment, make_schedule, sam_step, train_loss

RHO, LR, WD, MOMENTUM = 0.05, 0.1, 5e-4, 0.9


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3))


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)


def _grad64(model: torch.nn.Module, w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The cross-entropy gradient at weights ``w`` (float64, batch statistics, running statistics untouched)."""
    m64 = _tiny_model().double().train()
    buffers = {n: b.detach().clone().double() if b.is_floating_point() else b.clone() for n, b in model.named_buffers()}
    w = {n: v.detach().clone().requires_grad_(True) for n, v in w.items()}
    loss = F.cross_entropy(functional_call(m64, {**w, **buffers}, (x.double(),)), y)
    grads = torch.autograd.grad(loss, list(w.values()))
    return dict(zip(w, grads))


def _sam_by_hand(model, steps, adaptive: bool = False, base_from_perturbed: bool = False, rho: float = RHO):
    """SGD (momentum, weight decay) with SAM, in float64: g at w, e = rho g / ||g|| (adaptive: rho w^2 g / ||w g||),
    g' at w + e, then the SGD step from w with g'. ``base_from_perturbed``: the wrong step, from w + e."""
    w = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    buf = None
    for x, y in steps:
        g = _grad64(model, w, x, y)
        scaled = {n: (w[n].abs() * g[n]) if adaptive else g[n] for n in w}
        norm = math.sqrt(sum(float((s ** 2).sum()) for s in scaled.values()))
        e = {n: (w[n].abs() * scaled[n] if adaptive else scaled[n]) * rho / (norm + 1e-12) for n in w}
        at = {n: w[n] + e[n] for n in w}
        g2 = _grad64(model, at, x, y) if rho > 0 else g
        base = at if base_from_perturbed else w
        d = {n: g2[n] + WD * base[n] for n in w}
        buf = d if buf is None else {n: MOMENTUM * buf[n] + d[n] for n in w}
        w = {n: base[n] - LR * buf[n] for n in w}
    return w


def _sam_implemented(steps, adaptive: bool = False):
    model = _tiny_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for x, y in steps:
        sam_step(model, opt, lambda: F.cross_entropy(model(x), y), RHO, adaptive)
    return model


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_equals_the_step_written_out_by_hand(adaptive):
    steps = [_batch(1), _batch(2), _batch(3)]
    model = _sam_implemented(steps, adaptive)
    want = _sam_by_hand(_tiny_model(), steps, adaptive)
    got = dict(model.named_parameters())
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-5, atol=1e-6)
    # negative controls: the base step taken from w + e, plain SGD (rho = 0), and the other SAM variant all differ
    for wrong in (_sam_by_hand(_tiny_model(), steps, adaptive, base_from_perturbed=True),
                  _sam_by_hand(_tiny_model(), steps, adaptive, rho=0.0),
                  _sam_by_hand(_tiny_model(), steps, not adaptive)):
        assert max(float((got[n].detach().double() - wrong[n]).abs().max()) for n in want) > 1e-4


def test_sam_counts_each_batch_once_in_the_batchnorm_running_statistics():
    x, y = _batch(1)
    model = _tiny_model().train()
    bn = model[1]
    with torch.no_grad():
        expected_mean = 0.9 * bn.running_mean + 0.1 * model[0](x).mean(0)  # one update, at w
    sam_step(model, torch.optim.SGD(model.parameters(), lr=LR), lambda: F.cross_entropy(model(x), y), RHO)
    torch.testing.assert_close(bn.running_mean, expected_mean)
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 1  # momentum and batch count as after one pass
    # negative control: two plain forward passes move the running mean further
    twice = _tiny_model().train()
    twice(x), twice(x)
    assert not torch.allclose(twice[1].running_mean, expected_mean)


def test_label_smoothing_equals_torch_and_the_loss_written_out():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(32, 10, generator=g), torch.randint(0, 10, (32,), generator=g)
    cfg = TrainConfig(label_smoothing=0.1)
    got = train_loss(logits, labels, cfg)
    assert float(got) == pytest.approx(float(F.cross_entropy(logits, labels, label_smoothing=0.1)), rel=1e-6)
    logp = torch.log_softmax(logits.double(), dim=1)
    target = torch.full_like(logp, 0.1 / 10)
    target[torch.arange(32), labels] += 0.9
    assert float(got) == pytest.approx(float(-(target * logp).sum(1).mean()), rel=1e-6)
    # negative control: without smoothing the loss is the plain cross-entropy, which differs
    plain = train_loss(logits, labels, TrainConfig())
    assert float(plain) == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-6)
    assert abs(float(plain) - float(got)) > 1e-3


def test_the_step_schedule_and_the_crop_flip_augmentation():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = TrainConfig(epochs=10, lr=0.1, schedule="step")
    sched = make_schedule(opt, cfg, steps_per_epoch=3)
    seen = []
    for _ in range(10 * 3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    per_epoch = [seen[3 * e] for e in range(10)]
    assert per_epoch == pytest.approx([0.1] * 3 + [0.02] * 3 + [0.004] * 2 + [0.0008] * 2)
    one = torch.optim.SGD(model.parameters(), lr=0.1)
    make_schedule(one, TrainConfig(epochs=1, lr=0.1, schedule="step"), steps_per_epoch=3)
    assert one.param_groups[0]["lr"] == pytest.approx(0.1)  # a one-epoch run starts at lr (no milestone at 0)

    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5) + 1
    out = _augment(x, 2, np.random.default_rng(0), "crop_flip")
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(2):  # each image is its own crop of the padded image, flipped or not
        crops = [padded[i, :, dy:dy + 5, dx:dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)
    # over many images both the offsets and the flips vary per image (negative control: batch_shift shares them)
    many = torch.rand(64, 1, 5, 5) + 1
    a = _augment(many, 2, np.random.default_rng(1), "crop_flip")
    b = _augment(many, 2, np.random.default_rng(1), "batch_shift")
    zero_rows = lambda t: tuple(int(v) for v in (t == 0).all(-1).sum(-1).flatten())  # noqa: E731
    assert len(set(zero_rows(a))) > 1 and len(set(zero_rows(b))) == 1


def _params(tmp_path, **train):
    from tests.conftest import DIGITS

    return parse_params({
        "data": {"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.5], "datasets": {
            "id_train": {"source": "npz", "path": DIGITS, "classes": [0, 1, 2]},
            "id_test": {"source": "npz", "path": DIGITS, "classes": [0, 1, 2]},
            "ood": {"source": "npz", "path": DIGITS, "classes": [7]}}},
        "model": {"arch": "small_cnn", "num_classes": 3},
        "scoring": {"forward": {"msp": {}}, "gradient": {"knn": {}}},
        "train": {"epochs": 4, "batch_size": 32, "lr": 0.05, "sam_rho": 0.05, "label_smoothing": 0.1,
                  "schedule": "step", "augment": "crop_flip", **train},
    })


class _Killed(Exception):
    pass


def test_training_killed_after_epoch_2_of_4_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from lowgrad.data import ImageSet
    from lowgrad.models import fresh_model
    from lowgrad.paths import TRAIN_RESUME
    from lowgrad.train import finish_training, train_classifier

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (150, 8, 8, 1), dtype=np.uint8)
    train = ImageSet(images, rng.integers(0, 3, 150))
    params = _params(tmp_path)

    def run(p, seed: int = 0, stop_at: int | None = None):
        torch.manual_seed(seed)
        def stop(epoch: int) -> None:
            if epoch == stop_at:
                raise _Killed
        return train_classifier(fresh_model(p), train, p, torch.device("cpu"), on_epoch_end=stop).state_dict()

    whole = run(params)
    finish_training()
    assert not (tmp_path / TRAIN_RESUME).exists()
    with pytest.raises(_Killed):
        run(params, stop_at=2)
    assert torch.load(tmp_path / TRAIN_RESUME, weights_only=True)["epochs_done"] == 2
    resumed = run(params, seed=123)  # another initialisation: the weights come from the saved state
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    # negative controls: a run killed at epoch 2 and restarted without its state ends elsewhere; a state saved by
    # another recipe is not resumed (training starts afresh and ends with that recipe's own weights)
    finish_training()
    with pytest.raises(_Killed):
        run(params, stop_at=2)
    (tmp_path / TRAIN_RESUME).unlink()
    afresh = run(params, seed=123)
    assert any(not torch.equal(whole[n], afresh[n]) for n in whole if whole[n].is_floating_point())
    other = _params(tmp_path, lr=0.02)
    finish_training()
    other_whole = run(other)
    with pytest.raises(_Killed):
        run(params, stop_at=2)
    assert all(torch.equal(other_whole[n], v) for n, v in run(other).items())
