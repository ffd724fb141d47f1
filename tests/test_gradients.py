"""Per-sample gradients against an independent float64 single-sample autograd loop."""

from __future__ import annotations

import copy

import pytest
import torch

from lowgrad.errors import ConfigError, GradientError
from lowgrad.gradients import PerSampleGradients, check_exact_route, select_parameters
from lowgrad.models import build_model


def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics so eval-mode BatchNorm matters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _loop_reference(model: torch.nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    ref = copy.deepcopy(model)
    ref.load_state_dict(model.state_dict())
    ref.double().eval()
    params = dict(ref.named_parameters())
    rows = []
    for i in range(len(x)):
        s = torch.logsumexp(ref(x[i : i + 1].double()), dim=-1).sum()
        grads = torch.autograd.grad(s, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)




@pytest.mark.parametrize(
    "arch,channels,size,spec",
    [
        ("small_cnn", 1, 8, "all"),
        ("small_cnn", 1, 8, ["conv3", "head"]),
        ("resnet20_cifar", 3, 16, "all"),
        ("resnet18_cifar", 3, 8, ["layer4.1", "fc"]),
        ("torchvision:mobilenet_v3_small", 3, 32, ["features.11", "classifier"]),  # built by name: its head found
    ],
)
def test_per_sample_gradients_match_float64_loop(arch, channels, size, spec):
    torch.manual_seed(0)
    model = build_model(arch, 10 if arch != "small_cnn" else 6, channels).eval()
    _randomise_bn(model)
    names = select_parameters(model, spec)
    x = torch.randn(6, channels, size, size)
    grads, logits, feats = PerSampleGradients(model, names)(x)
    ref = _loop_reference(model, x, names)
    rel = ((grads.double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
    assert rel < 1e-5, rel
    with torch.no_grad():
        ref_logits, ref_feats = model(x, return_features=True)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats, ref_feats, rtol=1e-5, atol=1e-5)


def test_gradient_equals_softmax_weighted_logit_gradients():
    """docs/method.md 1: grad logsumexp = sum_c softmax_c grad f_c (checked on the head weight)."""
    torch.manual_seed(1)
    model = build_model("small_cnn", 6, 1).eval()
    x = torch.randn(3, 1, 8, 8)
    grads, logits, feats = PerSampleGradients(model, ["head.weight"])(x)
    expected = torch.einsum("nc,nf->ncf", torch.softmax(logits, 1), feats).reshape(3, -1)
    torch.testing.assert_close(grads, expected, rtol=1e-5, atol=1e-6)


def test_parameter_selection_errors_and_order():
    model = build_model("small_cnn", 6, 1)
    assert select_parameters(model, ["head", "conv1"]) == ["conv1.weight", "head.weight", "head.bias"]
    with pytest.raises(ConfigError, match="matches no parameter"):
        select_parameters(model, ["layer9"])


def test_non_finite_gradients_are_refused():
    model = build_model("small_cnn", 6, 1).eval()
    x = torch.randn(4, 1, 8, 8)
    x[2, 0, 0, 0] = float("nan")
    with pytest.raises(GradientError, match=r"batch rows \[2\]"):
        PerSampleGradients(model, select_parameters(model, "all"))(x)


def test_exact_route_refuses_large_models_naming_the_option():
    with pytest.raises(GradientError, match="gradient.params"):
        check_exact_route(11_173_962, 2_000_000)
    check_exact_route(1000, 2000)
