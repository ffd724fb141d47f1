"""Kronecker gradient sketches against exact per-sample gradients (torch.func) on small models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowgrad.gradients import PerSampleGradients, select_parameters
from lowgrad.models import build_model
from lowgrad.networks import FeatureClassifier
from lowgrad.kronecker import KroneckerSketch
from lowgrad.nfk_factors import fit_kronecker_nfk
from tests.test_gradients import _randomise_bn

from tests.conftest import DIGITS


def _exact_by_name(model, x):
    names = select_parameters(model, "all")
    grads, _, _ = PerSampleGradients(model, names)(x)
    out, start = {}, 0
    params = dict(model.named_parameters())
    for n in names:
        size = params[n].numel()
        out[n] = grads[:, start : start + size].double()
        start += size
    return out


def _expected_sketch(sketch: KroneckerSketch, exact: dict, b: int, weight_scale=None) -> torch.Tensor:
    parts = []
    for layer in sketch.layers:
        if layer.kind == "bn":
            parts += [exact[f"{layer.name}.weight"] * layer.exact_scale["weight"].double(),
                      exact[f"{layer.name}.bias"] * layer.exact_scale["bias"].double()]
            continue
        c_out = layer.module.weight.shape[0]
        g = exact[f"{layer.name}.weight"].reshape(b, c_out, -1)
        parts.append(torch.einsum("oc,bci,ri->bor", layer.p_out.double(), g, layer.p_in.double()).reshape(b, -1))
        if layer.module.bias is not None:
            parts.append(exact[f"{layer.name}.bias"] * layer.exact_scale["bias"].double())
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("arch,channels,size", [("small_cnn", 1, 8), ("resnet20_cifar", 3, 16)])
def test_sketch_equals_projected_exact_gradients(arch, channels, size):
    torch.manual_seed(0)
    model = build_model(arch, 6 if arch == "small_cnn" else 10, channels).eval()
    _randomise_bn(model)
    x = torch.randn(5, channels, size, size)
    sketch = KroneckerSketch(model, rank=8, seed=3)
    got, logits, _ = sketch(x)
    expected = _expected_sketch(sketch, _exact_by_name(model, x), 5)
    assert got.shape == (5, sketch.dim)
    rel = ((got.double() - expected).norm(dim=1) / expected.norm(dim=1)).max().item()
    assert rel < 1e-5, rel
    torch.testing.assert_close(logits, model(x))


def test_sketch_of_selected_layers_only():
    """``gradient.params: [layer3, linear]``: only those layers are sketched, and they equal the projected exact
    gradients of those parameters; the backward pass never reaches earlier layers."""
    torch.manual_seed(1)
    model = build_model("resnet20_cifar", 10, 3).eval()
    _randomise_bn(model)
    names = select_parameters(model, ["layer3", "linear"])
    x = torch.randn(4, 3, 16, 16)
    sketch = KroneckerSketch(model, rank=5, seed=2, param_names=names)
    assert {layer.name.split(".")[0] for layer in sketch.layers} == {"layer3", "linear"}
    covered = {f"{layer.name}.{p}" for layer in sketch.layers for p, _ in layer.module.named_parameters(recurse=False)}
    assert covered == set(names)
    got, _, _ = sketch(x)
    expected = _expected_sketch(sketch, _exact_by_name(model, x), 4)
    assert ((got.double() - expected).norm(dim=1) / expected.norm(dim=1)).max().item() < 1e-5
    full = KroneckerSketch(model, rank=5, seed=2)
    assert sketch.dim < full.dim
    factors, _ = fit_kronecker_nfk(model, [x], param_names=names)
    assert set(factors) == {layer.name for layer in sketch.layers}


def _nfk_scale(g: torch.Tensor) -> np.ndarray:
    """Direct NumPy w = d^(-1/2); zero-variance entries take the largest finite scale (docs/method.md 2)."""
    d = g.var(dim=0, unbiased=False).numpy()
    w = np.zeros_like(d)
    w[d > 0] = 1 / np.sqrt(d[d > 0])
    w[d == 0] = w[d > 0].max()
    return w


def test_leading_singular_pair_matches_the_svd():
    from lowgrad.nfk_factors import _leading_singular_pair, rank_one_masked

    w = np.random.default_rng(0).uniform(0.1, 3.0, (40, 90)) ** 3  # positive, like an NFK scale matrix
    a, b = _leading_singular_pair(w)
    u, s, vt = np.linalg.svd(w)
    np.testing.assert_allclose(np.outer(a, b), s[0] * np.outer(u[:, 0], vt[0]), rtol=1e-8, atol=1e-10 * s[0])
    a2, b2 = rank_one_masked(w, np.ones_like(w, dtype=bool))  # nothing masked: the plain best rank-1
    np.testing.assert_allclose(np.outer(a2, b2), np.outer(a, b))


def test_nfk_factors_fold_into_the_projections():
    torch.manual_seed(1)
    model = build_model("small_cnn", 6, 1).eval()
    _randomise_bn(model)
    kernel = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    factors, errors = fit_kronecker_nfk(model, kernel, rank_one_iters=5000)  # converged: the stationarity check
    assert set(errors) == {"conv1", "conv2", "conv3", "head"} and all(0 <= e < 1 for e in errors.values())
    _, default_errors = fit_kronecker_nfk(model, kernel)  # the default 100 sweeps: within 1 % of that error
    for layer, err in errors.items():
        assert err <= default_errors[layer] <= 1.01 * err

    # the estimated scale equals the direct diagonal Fisher of exact per-sample gradients
    exact = _exact_by_name(model, torch.cat(kernel))
    for name in ("bn2.weight", "head.bias"):
        layer, part = name.rsplit(".", 1)
        np.testing.assert_allclose(factors[layer][part], _nfk_scale(exact[name]), rtol=1e-5)
    g2 = exact["conv2.weight"].reshape(48, -1)
    w_conv2 = _nfk_scale(g2).reshape(32, -1)
    mask = (g2.var(dim=0, unbiased=False).numpy() > 0).reshape(32, -1)
    assert not mask.all()  # the case the masked fit exists for
    a, b = factors["conv2"]["a"], factors["conv2"]["b"]
    fit = np.outer(a, b)
    # stationarity of the masked least-squares fit (independent of how it was computed) ...
    resid = np.where(mask, w_conv2 - fit, 0.0)
    assert np.abs(resid @ b).max() <= 1e-4 * np.abs(np.where(mask, w_conv2, 0) @ b).max()
    assert np.abs(resid.T @ a).max() <= 1e-4 * np.abs(np.where(mask, w_conv2, 0).T @ a).max()
    # ... no worse on the fitted entries than the unmasked SVD rank-1, and the reported error is that error
    u, s, vt = np.linalg.svd(np.where(mask, w_conv2, 0.0))
    svd_fit = s[0] * np.outer(u[:, 0], vt[0])
    masked_err = lambda f: np.linalg.norm((w_conv2 - f)[mask]) / np.linalg.norm(w_conv2[mask])  # noqa: E731
    assert masked_err(fit) <= masked_err(svd_fit) + 1e-9
    # the error is computed from the fit's own w, which matches the exact one to rtol 1e-5 (above): same tolerance
    assert errors["conv2"] == pytest.approx(masked_err(fit), rel=1e-5)

    # sketching with the factors = sketching (a b^T) * G exactly
    x = torch.randn(4, 1, 8, 8)
    scaled = KroneckerSketch(model, rank=6, seed=0, factors=factors)
    plain = KroneckerSketch(model, rank=6, seed=0)
    exact_x = _exact_by_name(model, x)
    for layer in plain.layers:
        if layer.kind != "bn":
            c_out = layer.module.weight.shape[0]
            ab = torch.tensor(np.outer(factors[layer.name]["a"], factors[layer.name]["b"])).reshape(-1)
            exact_x[f"{layer.name}.weight"] = (exact_x[f"{layer.name}.weight"].reshape(4, -1) * ab).reshape(4, c_out, -1)
    expected = _expected_sketch(plain, exact_x, 4)
    # exact parts: the plain sketch has unit scales, the scaled one the exact w
    got, _, _ = scaled(x)
    sl = 0
    for layer in scaled.layers:
        if layer.kind == "bn":
            for part in ("weight", "bias"):
                c = layer.module.num_features
                expected[:, sl : sl + c] *= layer.exact_scale[part].double()
                sl += c
        else:
            sl += layer.p_out.shape[0] * layer.p_in.shape[0]
            if layer.module.bias is not None:
                c = layer.module.weight.shape[0]
                expected[:, sl : sl + c] *= layer.exact_scale["bias"].double()
                sl += c
    rel = ((got.double() - expected).norm(dim=1) / expected.norm(dim=1)).max().item()
    assert rel < 1e-5, rel


def test_sketch_inner_products_improve_with_rank():
    """Random Kronecker projections preserve inner products in expectation; the error shrinks with rank."""
    torch.manual_seed(2)
    model = build_model("resnet20_cifar", 10, 3).eval()
    x = torch.randn(12, 3, 16, 16)
    exact = torch.cat([v.reshape(12, -1) for v in _exact_by_name(model, x).values()], dim=1)
    gram = exact @ exact.T

    def error(rank):
        errs = []
        for seed in range(3):
            s, _, _ = KroneckerSketch(model, rank=rank, seed=seed)(x)
            s = s.double()
            errs.append(((s @ s.T - gram).norm() / gram.norm()).item())
        return float(np.mean(errs))

    low, high = error(2), error(16)
    assert high < 0.5 * low, (low, high)
    assert high < 0.5


def test_dense_sketch_equals_scaled_exact_gradients_times_omega():
    """Dense route: (w * g) Omega with Omega assembled from its seeded row blocks (ResNet-20: 9 blocks), against
    exact float64 per-sample gradients; and the exact NFK scale against a direct NumPy variance."""
    from lowgrad.dense_sketch import BLOCK_ROWS, DenseSketch, fit_dense_nfk, omega_block

    torch.manual_seed(3)
    model = build_model("resnet20_cifar", 10, 3).eval()
    _randomise_bn(model)
    names = select_parameters(model, "all")
    kernel = torch.randn(10, 3, 16, 16)
    w = fit_dense_nfk(model, names, [kernel[:6], kernel[6:]])
    exact_kernel = torch.cat(list(_exact_by_name(model, kernel).values()), dim=1)
    reference = _nfk_scale(exact_kernel)  # float64 gradients; compare the variances d = w^-2 (float32 gradient
    d, d_ref = w**-2.0, reference**-2.0  # noise dominates where d is ~1e-17 of its maximum)
    np.testing.assert_allclose(d, d_ref, rtol=1e-4, atol=1e-7 * d_ref.max())

    x = torch.randn(3, 3, 16, 16)
    sketch = DenseSketch(model, names, dim=48, seed=5, scale=w)
    got, logits, _ = sketch(x)
    p = sketch.n_params
    assert p > 8 * BLOCK_ROWS and got.shape == (3, 48)
    omega = torch.cat([omega_block(5, b, min(BLOCK_ROWS, p - s), 48, torch.device("cpu"))
                       for b, s in enumerate(range(0, p, BLOCK_ROWS))]).double()
    exact = torch.cat(list(_exact_by_name(model, x).values()), dim=1) * torch.as_tensor(w)
    expected = exact @ omega
    assert ((got.double() - expected).norm(dim=1) / expected.norm(dim=1)).max().item() < 1e-4
    torch.testing.assert_close(logits, model(x))


def test_dense_sketch_preserves_inner_products():
    """E <Omega^T a, Omega^T b> = <a, b>: at D = 4096 the Gram matrix of 12 small-CNN gradients is kept to a
    few percent (relative error about 1/sqrt(D) per entry), and a different seed gives a different sketch."""
    from lowgrad.dense_sketch import DenseSketch

    torch.manual_seed(4)
    model = build_model("small_cnn", 6, 1).eval()
    _randomise_bn(model)
    names = select_parameters(model, "all")
    x = torch.randn(12, 1, 8, 8)
    exact = torch.cat(list(_exact_by_name(model, x).values()), dim=1)
    gram = exact @ exact.T
    s = DenseSketch(model, names, dim=4096, seed=0)(x)[0].double()
    assert ((s @ s.T - gram).norm() / gram.norm()).item() < 0.08
    other = DenseSketch(model, names, dim=4096, seed=1)(x)[0].double()
    assert not torch.allclose(s, other)


@pytest.mark.parametrize("route", ["kronecker", "exact_nfk", "dense"])
def test_sketched_route_through_the_pipeline_functions(tmp_path, monkeypatch, route):
    """factors -> extract (sketch) -> subspace (centring only) -> project, and the store's sketch metadata
    (seed, rank, layer list) is checked on reopen."""
    from lowgrad.config import parse_params
    from lowgrad.data import load_dataset, save_image_set
    from lowgrad.errors import StoreError
    from lowgrad.paths import EXTRACTED, FACTORS_INFO, MODEL, PREPARED
    from lowgrad.pipeline import BODIES
    from lowgrad.store import ChunkedStore

    extract, fit_factors, fit_subspace, project = (BODIES[s] for s in ("extract", "factors", "subspace", "project"))

    monkeypatch.chdir(tmp_path)
    params = parse_params({
        "seed": 0, "device": "cpu",
        "data": {"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.5], "datasets": {
            "id_train": {"source": "npz", "path": DIGITS, "classes": [0, 1, 2], "max_samples": 120},
            "id_test": {"source": "npz", "path": DIGITS, "classes": [0, 1, 2], "max_samples": 40},
            "ood": {"source": "npz", "path": DIGITS, "classes": [7], "max_samples": 40}}},
        "model": {"arch": "small_cnn", "num_classes": 3},
        "gradient": {"sketch": route, **({"sketch_rank": 4} if route == "kronecker" else {"sketch_dim": 96}),
                     "factor_samples": 64, "chunk_rows": 32,
                     "batch_size": 16},
        "subspace": {"k": 6},
        "scoring": {"forward": {"msp": {}}, "gradient": {"knn": {}}},
    })
    for name in params.data.datasets:
        save_image_set(PREPARED.format(name=name), load_dataset(name, params.data, 0))
    torch.manual_seed(0)
    (tmp_path / "models").mkdir()
    torch.save(build_model("small_cnn", 3, 1).state_dict(), MODEL)

    fit_factors(params)
    import json

    info = json.loads((tmp_path / FACTORS_INFO).read_text())
    assert info["kernel_samples"] == 64
    if route == "kronecker":
        assert set(info["rank_one_relative_error"]) == {"conv1", "conv2", "conv3", "head"}
    for name in params.data.datasets:
        extract(params, name)
    store = ChunkedStore.open(EXTRACTED.format(name="id_train"))
    meta = store.meta
    label = {"exact_nfk": "exact_nfk_countsketch"}.get(route, f"{route}_sketch")
    assert meta["gradients"] == label and meta["sketch_seed"] == 0
    if route == "exact_nfk":
        assert store.columns["grads"][0] == 96 + 2 * (16 + 32 + 32) + 3  # buckets + BatchNorm weights and biases + head bias
    elif route == "kronecker":
        assert meta["sketch_rank"] == 4 and [layer[0] for layer in meta["sketch_layers"]][:3] == ["conv1", "bn1", "conv2"]
        assert store.columns["grads"][0] < meta["n_params"] == 14_227  # a sketch, not the 14,227 exact entries
    else:
        assert store.columns["grads"][0] == 96 and meta["n_params"] == meta["sketch_layers"]["n_params"] == 14_227
    fit_subspace(params)
    project(params, "ood")
    g_low = np.load("artifacts/projected/ood.npy")
    assert g_low.shape == (40, 6) and np.isfinite(g_low).all()
    # ||phi||^2 of the sketched rows, from the same pass: against the stored sketch rows and the fitted centring
    from lowgrad.subspace import GradientSubspace

    sub = GradientSubspace.load("artifacts/subspace/subspace.npz")
    ood_store = ChunkedStore.open(EXTRACTED.format(name="ood"))
    phi = sub.normalizer_.transform(ood_store.read("grads"))
    sqnorm = np.load("artifacts/projected/ood.sqnorm.npy")
    if route == "exact_nfk":  # rows taken as they are; ||phi||^2 is the exact value extract stored
        assert sub.kernel == "ntk" and "phi_sqnorm" in ood_store.columns
        np.testing.assert_allclose(phi, ood_store.read("grads"))
        np.testing.assert_array_equal(sqnorm, ood_store.read("phi_sqnorm")[:, 0])
        assert not np.allclose(sqnorm, (phi**2).sum(1), rtol=1e-3)  # not the sketched rows' norm
    else:
        np.testing.assert_allclose(sqnorm, (phi**2).sum(1), rtol=1e-10)

    other_seed = {**meta, "sketch_seed": 1}
    with pytest.raises(StoreError, match="meta.sketch_seed: stored 0, requested 1"):
        ChunkedStore.create_or_resume(store.path, store.n_rows, {k: tuple(v) for k, v in store.columns.items()}, store.chunk_rows, other_seed)
    if route == "dense":  # a set whose Omega came from another device's generator is refused by project (issue 40)
        import zarr

        assert sub.sketch_layout_ == meta["sketch_layers"] and meta["sketch_layers"]["omega_drawn_on"] == "cpu"
        group = zarr.open_group(str(ood_store.path), mode="r+")
        group.attrs["meta"] = {**group.attrs["meta"], "sketch_layers": {**meta["sketch_layers"], "omega_drawn_on": "cuda (A100)"}}
        with pytest.raises(StoreError, match=r"the rows of ood were sketched with .*cuda \(A100\)"):
            project(params, "ood")


# -- the exact-NFK route: exact NFK scale and exact ||phi|| inside a CountSketch --------------------------------------
from lowgrad.exact_nfk import ExactNFKSketch  # noqa: E402
from lowgrad.nfk_factors import fit_exact_nfk  # noqa: E402


def _exact_phi_reference(model, x_kernel, x):
    """float64 reference: full per-sample gradients (torch.func), w = var^(-1/2) and z = mean over the kernel rows
    (zero-variance entries take the largest w), phi = w * (g - z), per parameter name."""
    kernel, rows = _exact_by_name(model, x_kernel), _exact_by_name(model, x)
    phi = {}
    for name, g in kernel.items():
        var = g.var(dim=0, unbiased=False)
        w = torch.zeros_like(var)
        w[var > 0] = var[var > 0].rsqrt()
        w[var <= 0] = w[var > 0].max() if (var > 0).any() else 1.0
        phi[name] = (rows[name] - g.mean(dim=0)) * w
    return phi


def _countsketch_loop(sketch: ExactNFKSketch, phi: dict, b: int) -> torch.Tensor:
    """The CountSketch written out: every weight coordinate j adds sign_j * phi_j to bucket h(j) (the sketch's seeded
    buckets and signs, one each per coordinate), then the exact biases / BatchNorm parameters."""
    hashed = torch.zeros(b, sketch.sketch_dim, dtype=torch.float64)
    small = []
    for layer in sketch.layers:
        if layer.kind == "bn":
            small += [phi[f"{layer.name}.weight"], phi[f"{layer.name}.bias"]]
            continue
        bucket, signs = sketch.buckets(layer.name), sketch.signs[layer.name].flatten()
        assert bucket.shape == signs.shape == (layer.module.weight.numel(),)  # one bucket and one sign each
        assert set(signs.tolist()) == {-1.0, 1.0} and int(bucket.min()) >= 0 and int(bucket.max()) < sketch.sketch_dim
        values = phi[f"{layer.name}.weight"]
        for j, (j_bucket, sign) in enumerate(zip(bucket.tolist(), signs.tolist())):
            hashed[:, j_bucket] += sign * values[:, j]
        if layer.module.bias is not None:
            small.append(phi[f"{layer.name}.bias"])
    return torch.cat([hashed, *small], dim=1)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 5e-3)])  # w, z stored as float32
def test_exact_nfk_sketch_is_the_countsketch_of_the_exact_nfk_rows(dtype, tol):
    """The output is the CountSketch of w * (G - z) of the exact gradient (biases / BatchNorm exact), and the fourth
    output is the exact ||phi||^2 over all parameters (not the sketched row's norm). float32: g - z cancels where
    the kernel variance is tiny, so the tolerance is looser."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 6, 1).eval()
    _randomise_bn(model)
    model = model.to(dtype)
    x_kernel, x = torch.randn(24, 1, 8, 8, dtype=dtype), torch.randn(5, 1, 8, 8, dtype=dtype)
    sketch = ExactNFKSketch(model, dim=64, seed=3, normalisation=fit_exact_nfk(model, [x_kernel[:10], x_kernel[10:]]))
    sketch.max_block_floats = 3 * 32 * 288  # force sub-batches (the bounded-memory path)
    got, logits, _, sqnorm = sketch(x)
    phi = _exact_phi_reference(model, x_kernel, x)
    expected = _countsketch_loop(sketch, phi, 5)
    assert got.shape == (5, sketch.dim)
    rel = ((got.double() - expected).norm(dim=1) / expected.norm(dim=1)).max().item()
    assert rel < tol, rel
    exact_sq = sum((v**2).sum(dim=1) for v in phi.values())
    torch.testing.assert_close(sqnorm, exact_sq, rtol=tol, atol=0)
    torch.testing.assert_close(logits, model(x))
    # negative controls: 64 buckets cannot keep the norm (so the exact one is not the sketch's), and another seed
    # hashes elsewhere
    assert not torch.allclose((got.double() ** 2).sum(1), exact_sq, rtol=1e-2)
    other = ExactNFKSketch(model, dim=64, seed=4, normalisation=fit_exact_nfk(model, [x_kernel]))(x)[0]
    assert not torch.allclose(other, got)


def test_exact_nfk_sketch_hashes_alike_with_the_cpu_kernel_and_with_torch_ops(two_threads):
    """The one-pass CPU kernel and the torch ops other devices run (``index_add_`` at each coordinate's bucket) give
    the same sketch and squared norms through the whole sketch, sub-batches included."""
    torch.manual_seed(1)
    model = build_model("small_cnn", 6, 1).eval()
    _randomise_bn(model)
    x_kernel, x = torch.randn(16, 1, 8, 8), torch.randn(5, 1, 8, 8)
    sketch = ExactNFKSketch(model, dim=40, seed=3, normalisation=fit_exact_nfk(model, [x_kernel]))
    sketch.max_block_floats = 3 * 32 * 288
    got, _, _, sqnorm = sketch(x)  # the kernel's rows split over two threads
    sketch.cpu_kernel = False
    by_torch, _, _, sqnorm_torch = sketch(x)
    torch.testing.assert_close(got, by_torch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sqnorm, sqnorm_torch, rtol=1e-6, atol=0)


def test_exact_nfk_sketch_without_normalisation_hashes_the_raw_gradient():
    """The NTK kernel (no normalisation): the output is the CountSketch of the raw exact gradient (the signs alone
    scale it) and the fourth output its exact squared norm. Negative control: the unsigned bucket sums differ."""
    torch.manual_seed(2)
    model = build_model("small_cnn", 6, 1).eval().double()
    _randomise_bn(model)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    sketch = ExactNFKSketch(model, dim=48, seed=5, normalisation=None)
    got, _, _, sqnorm = sketch(x)
    raw = _exact_by_name(model, x)
    torch.testing.assert_close(got, _countsketch_loop(sketch, raw, 4), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sqnorm, sum((v**2).sum(dim=1) for v in raw.values()), rtol=1e-9, atol=0)
    unsigned = {k: v for k, v in raw.items()}
    for layer in sketch.layers:  # the same buckets without the signs
        if layer.kind != "bn":
            unsigned[f"{layer.name}.weight"] = raw[f"{layer.name}.weight"] * sketch.signs[layer.name].flatten().double()
    assert not torch.allclose(got, _countsketch_loop(sketch, unsigned, 4), rtol=1e-3)


def test_exact_nfk_sketch_keeps_the_gram_matrix_of_resnet20_rows():
    """ResNet-20 at 32x32 (as the fidelity benchmark, smaller): with 8,192 buckets the CountSketch keeps the Gram
    matrix of exact NFK rows, off-diagonal correlation > 0.99, and the fourth output is the exact squared norm."""
    torch.manual_seed(1)
    model = build_model("resnet20_cifar", 10, 3).eval()
    _randomise_bn(model)
    x_kernel, x = torch.randn(32, 3, 16, 16), torch.randn(12, 3, 16, 16)
    sketch = ExactNFKSketch(model, dim=8192, seed=2, normalisation=fit_exact_nfk(model, [x_kernel]))
    got, _, _, sqnorm = sketch(x)
    phi = torch.cat(list(_exact_phi_reference(model, x_kernel, x).values()), dim=1)
    gram, gram_s = phi @ phi.T, got.double() @ got.double().T
    off = ~torch.eye(12, dtype=torch.bool)
    corr = np.corrcoef(gram[off].numpy(), gram_s[off].numpy())[0, 1]
    assert corr > 0.99, corr
    torch.testing.assert_close(sqnorm, (phi**2).sum(1), rtol=5e-3, atol=0)


class _WithLayerNorm(FeatureClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 3)

    def forward_features(self, x):
        return self.norm(self.conv(x).mean(dim=(2, 3)))


def test_the_kronecker_sketch_refuses_what_it_would_leave_out():
    """Never a silently missing parameter: a selected layer the sketch cannot take is refused by name, with the
    routes that take it; without it the same model is sketched."""
    from lowgrad.errors import GradientError

    torch.manual_seed(0)
    model = _WithLayerNorm().eval()
    with pytest.raises(GradientError, match=r"2 selected parameters would be left out \(e.g. 'norm.weight' of a "
                                            r"LayerNorm; parameters of LayerNorm\); use a route .*gradient.sketch: none or dense"):
        KroneckerSketch(model, rank=2, seed=0)
    sketch = KroneckerSketch(model, rank=2, seed=0, param_names=["conv.weight", "conv.bias", "head.weight", "head.bias"])
    assert [layer.name for layer in sketch.layers] == ["conv", "head"]
    assert sketch(torch.randn(2, 3, 6, 6))[0].shape == (2, sketch.dim)
    model.conv.__class__ = type("StdConv2d", (torch.nn.Conv2d,), {})  # a subclass may change forward: not sketched
    with pytest.raises(GradientError, match=r"2 selected parameters would be left out \(e.g. 'conv.bias' of a StdConv2d"):
        KroneckerSketch(model, rank=2, seed=0, param_names=["conv.weight", "conv.bias", "head.weight", "head.bias"])
    model.conv.__class__ = torch.nn.Conv2d
    model.conv.padding_mode = "reflect"  # the projection of zero-padded patches would not be this layer's gradient
    with pytest.raises(GradientError, match=r"layer conv: a Conv2d with padding .* padding_mode 'reflect'"):
        KroneckerSketch(model, rank=2, seed=0, param_names=["conv.weight", "conv.bias", "head.weight", "head.bias"])


class _GroupedAndTokens(FeatureClassifier):
    """A grouped conv, a depthwise conv with stride, BatchNorm, a Linear layer on tokens (with bias), the head."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = torch.nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.mix = torch.nn.Linear(8, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward_features(self, x):
        x = self.depthwise(torch.relu(self.bn(self.grouped(x))))
        return torch.relu(self.mix(x.flatten(2).transpose(1, 2))).mean(dim=1)  # mix on (B, tokens, channels)


def test_grouped_convolutions_and_token_layers_are_sketched_exactly():
    """Against the projection of torch.func's exact gradients (weights laid out C_out x C_in/groups*kh*kw); a
    Linear layer on tokens sums over them. Negative control: ignoring the groups (one P_in over all channels) gives
    another sketch."""
    torch.manual_seed(0)
    model = _GroupedAndTokens().eval()
    _randomise_bn(model)
    x = torch.randn(5, 4, 6, 6)
    sketch = KroneckerSketch(model, rank=4, seed=1)
    assert [layer.name for layer in sketch.layers] == ["grouped", "bn", "depthwise", "mix", "head"]
    got = sketch(x)[0].double()
    expected = _expected_sketch(sketch, _exact_by_name(model, x), 5)
    rel = ((got - expected).norm(dim=1) / expected.norm(dim=1)).max().item()
    assert rel < 1e-5, rel
    exact = _exact_by_name(model, x)
    wrong = dict(exact)  # the grouped weight read as if it were dense over all input channels
    wrong["grouped.weight"] = exact["grouped.weight"].reshape(5, 2, 4, -1).flip(1).reshape(5, -1)
    assert not torch.allclose(_expected_sketch(sketch, wrong, 5), got, rtol=1e-3)
    factors, errors = fit_kronecker_nfk(model, [torch.randn(16, 4, 6, 6)])  # the NFK factors fit these layers too
    assert factors["depthwise"]["b"].shape == (9,) and factors["mix"]["a"].shape == (6,) and set(errors) == {
        "grouped", "depthwise", "mix", "head"}


def test_exact_nfk_sketch_of_grouped_and_token_layers():
    torch.manual_seed(0)
    model = _GroupedAndTokens().eval().double()
    _randomise_bn(model)
    x_kernel, x = torch.randn(20, 4, 6, 6, dtype=torch.float64), torch.randn(4, 4, 6, 6, dtype=torch.float64)
    sketch = ExactNFKSketch(model, dim=32, seed=3, normalisation=fit_exact_nfk(model, [x_kernel]))
    got, _, _, sqnorm = sketch(x)
    phi = _exact_phi_reference(model, x_kernel, x)
    expected = _countsketch_loop(sketch, phi, 4)
    assert ((got - expected).norm(dim=1) / expected.norm(dim=1)).max().item() < 1e-5  # w, z stored as float32
    torch.testing.assert_close(sqnorm, sum((v**2).sum(dim=1) for v in phi.values()), rtol=1e-5, atol=0)


def test_mobilenet_v3_small_by_name_on_the_kronecker_sketch():
    """torchvision's depthwise MobileNet: every parameter is sketched (none refused), equal to the projected exact
    per-sample gradients."""
    torch.manual_seed(0)
    model = build_model("torchvision:mobilenet_v3_small", 10, 3, 32).eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 32, 32)
    sketch = KroneckerSketch(model, rank=4, seed=0)
    covered = {f"{layer.name}.{p}" for layer in sketch.layers for p, _ in layer.module.named_parameters(recurse=False)}
    assert covered == {n for n, _ in model.named_parameters()}
    assert any(getattr(layer.module, "groups", 1) > 1 for layer in sketch.layers)
    got = sketch(x)[0].double()
    expected = _expected_sketch(sketch, _exact_by_name(model, x), 2)
    rel = ((got - expected).norm(dim=1) / expected.norm(dim=1)).max().item()
    assert rel < 1e-4, rel


def test_in_place_operations_after_a_layer_do_not_change_its_sketch():
    """torchvision's ResNet applies ReLU(inplace=True) to BatchNorm outputs and adds the shortcut in place: the
    captured output gradients must still be the layers' own (they were the later op's, a silent error on the BN
    parameters). A module called twice is refused by name."""
    from lowgrad.errors import GradientError

    torch.manual_seed(0)
    model = build_model("torchvision:resnet18", 10, 3, 32).eval()
    assert any(isinstance(m, torch.nn.ReLU) and m.inplace for m in model.modules())  # the case under test
    _randomise_bn(model)
    x = torch.randn(2, 3, 32, 32)
    sketch = KroneckerSketch(model, rank=4, seed=0)
    got = sketch(x)[0].double()
    expected = _expected_sketch(sketch, _exact_by_name(model, x), 2)
    assert ((got - expected).norm(dim=1) / expected.norm(dim=1)).max().item() < 1e-4

    class Twice(FeatureClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.head = torch.nn.Linear(3, 2)

        def forward_features(self, x):
            return self.conv(self.conv(x)).mean(dim=(2, 3))

    with pytest.raises(GradientError, match="layer conv runs more than once in a forward pass"):
        KroneckerSketch(Twice().eval(), rank=2, seed=0)(torch.randn(2, 3, 5, 5))


@pytest.mark.parametrize("conv,size", [
    (dict(in_channels=3, out_channels=4, kernel_size=(3, 5), padding=(2, 1)), 9),  # many positions: grouped conv
    (dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1), 9),  # strided, 25 positions: grouped
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=(2, 1), dilation=2, padding=2, groups=2), 9),
    (dict(in_channels=3, out_channels=40, kernel_size=3, padding=1), 5),  # fewer positions than channels: patches
    (dict(in_channels=3, out_channels=40, kernel_size=3, stride=2, padding=1), 9),  # strided, few positions: patches
    (dict(in_channels=4, out_channels=40, kernel_size=3, padding=1, groups=2), 5),  # grouped, few positions
])
def test_per_sample_conv_weight_gradients_on_either_path(conv, size):
    """``exact_layer_gradients`` of a Conv2d equals each sample's own autograd gradient (float64), whether formed
    as one grouped weight-gradient convolution over the batch (more positions than output channels) or from
    unfolded patches, written into ``out`` or not. Negative control: another sample's output gradient gives another gradient."""
    from lowgrad.layer_capture import _forms_by_grouped_convolution, exact_layer_gradients

    torch.manual_seed(0)
    layer = torch.nn.Conv2d(**conv, bias=False).double()
    x = torch.randn(5, conv["in_channels"], size, size, dtype=torch.float64)
    delta = torch.randn_like(layer(x))
    expected = torch.stack([torch.autograd.grad((layer(x[i : i + 1]) * delta[i : i + 1]).sum(), layer.weight)[0]
                            for i in range(len(x))]).reshape(len(x), layer.out_channels, -1)
    assert _forms_by_grouped_convolution(layer, delta) == (conv["out_channels"] < delta[0, 0].numel())
    got = exact_layer_gradients("conv", layer, x, delta)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    out = torch.full_like(expected, float("nan"))
    assert exact_layer_gradients("conv", layer, x, delta, out=out) is out
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(exact_layer_gradients("conv", layer, x, delta.roll(1, dims=0)), expected)
