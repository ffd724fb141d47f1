"""The NFK scale the layer-wise sketches need, estimated from exact per-layer gradients of a kernel sample one
layer at a time (never the whole P-vector): per parameter ``w = d^(-1/2)`` (``d``: the gradients' variance) and
the centre ``z`` (their mean) for the exact-NFK sketch, or per Conv2d / Linear weight the best rank-1 ``a b^T`` of
``w`` for the Kronecker sketch (:func:`rank_one_masked`)."""

from __future__ import annotations

import numpy as np
import torch

from lowgrad.errors import GradientError
from lowgrad.layer_capture import LayerCapture, bias_gradients, bn_normalised, exact_layer_gradients
from lowgrad.networks import FeatureClassifier
from lowgrad.subspace import add_block_moments, nfk_scale


def layer_gradient_moments(
    model: FeatureClassifier, batches, param_names: list[str] | None = None
) -> tuple[LayerCapture, dict[str, tuple]]:
    """Running ``(n, mean, M2)`` of the exact per-sample gradients of every sketchable parameter over ``batches``
    (an iterable of input tensors), keyed ``<layer>.weight`` / ``<layer>.bias``, accumulated layer by layer so that
    memory holds one layer's per-sample gradients of one batch."""
    sketch = LayerCapture(model, param_names)
    moments: dict[str, tuple] = {}

    def update(key: str, values: torch.Tensor) -> None:
        moments[key] = add_block_moments(moments.get(key), values)  # float64 moments, summed where values are

    for x in batches:
        if len(x) == 0:
            continue
        inputs, deltas, _, _ = sketch.capture(x)
        for layer in sketch.layers:
            xin, d = inputs[layer.name], deltas[layer.name]
            m = layer.module
            if layer.kind == "bn":
                update(f"{layer.name}.weight", (d * bn_normalised(m, xin)).sum(dim=(2, 3)))
                update(f"{layer.name}.bias", d.sum(dim=(2, 3)))
                continue
            update(f"{layer.name}.weight", exact_layer_gradients(layer.kind, m, xin, d))
            if m.bias is not None:
                update(f"{layer.name}.bias", bias_gradients(layer.kind, d))
    if not moments:
        raise GradientError("no kernel samples to estimate the NFK factors from")
    return sketch, {key: (n, mean.cpu(), m2.cpu()) for key, (n, mean, m2) in moments.items()}  # only the sums


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
