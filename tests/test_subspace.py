"""Kernel normalisation and subspace bases against direct NumPy computations and an exact SVD."""

from __future__ import annotations

import numpy as np
import pytest

from lowgrad.config import SubspaceConfig
from lowgrad.store import ChunkedStore
from lowgrad.subspace import GradientSubspace, KernelNormalizer, RowPasses, incremental_pca, randomized_svd


def subspace(**options) -> GradientSubspace:
    """A :class:`GradientSubspace` with params.yaml's ``subspace`` defaults (:class:`SubspaceConfig`) and seed 0,
    ``options`` replaced."""
    return GradientSubspace(**{**SubspaceConfig().model_dump(), "seed": 0, **options})


def _blocks(matrix: np.ndarray, rows: int):
    return lambda: ((slice(i, min(i + rows, len(matrix))), matrix[i : i + rows]) for i in range(0, len(matrix), rows))


def _decaying(n: int, p: int, seed: int = 0, decay: float = 0.85) -> np.ndarray:
    """Rows with a geometrically decaying spectrum plus small noise."""
    rng = np.random.default_rng(seed)
    r = min(n, p)
    u, _ = np.linalg.qr(rng.standard_normal((n, r)))
    v, _ = np.linalg.qr(rng.standard_normal((p, r)))
    s = 100.0 * decay ** np.arange(r)
    return (u * s) @ v.T + 0.01 * rng.standard_normal((n, p))


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """||A^T B||_F^2 / k for orthonormal columns: 1 = same subspace."""
    return float(np.linalg.norm(a.T @ b) ** 2 / a.shape[1])


def test_nfk_normalizer_matches_direct_numpy():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((103, 40)) * rng.uniform(0.1, 5, 40) + rng.standard_normal(40)
    g[:, 7] = 3.25  # zero-variance coordinate: takes the largest finite scale
    norm = KernelNormalizer("nfk").fit(_blocks(g, 17))
    z = g.mean(axis=0)
    d = ((g - z) ** 2).mean(axis=0)
    w = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0)
    w[7] = w[d > 0].max()
    np.testing.assert_allclose(norm.mean_, z, rtol=1e-12)
    np.testing.assert_allclose(norm.fisher_diag_, d, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(norm.transform(g), w * (g - z), rtol=1e-10)
    assert norm.n_zero_variance_ == 1


def test_ntk_is_identity():
    g = np.random.default_rng(1).standard_normal((20, 5))
    np.testing.assert_array_equal(KernelNormalizer("ntk").fit(_blocks(g, 6)).transform(g), g)


def test_randomized_svd_over_zarr_matches_exact_svd(tmp_path):
    phi = _decaying(600, 300, decay=0.92)
    store = ChunkedStore.create_or_resume(tmp_path / "s.zarr", 600, {"grads": (300, "float64")}, 128, {})
    for i in store.pending():
        store.write_chunk(i, {"grads": phi[store.chunk_slice(i)]})
    store.finalize()
    k = 40
    passes = RowPasses(lambda: store.iter_chunks("grads"), 600, 300)
    v, s, total = randomized_svd(passes, k, oversample=10, power_iters=4, seed=0)
    _, s_ref, vt_ref = np.linalg.svd(phi, full_matrices=False)
    v_ref = vt_ref[:k].T
    assert overlap(v_ref[:, :10], v[:, :10]) > 0.999
    assert overlap(v_ref, v) > 0.99
    assert np.all(np.diff(s) <= 0), "columns must be sorted by singular value"
    np.testing.assert_allclose(s[:10], s_ref[:10], rtol=1e-6)
    np.testing.assert_allclose(total, np.square(phi).sum(), rtol=1e-12)


def test_randomized_svd_fails_without_power_iterations_on_flat_spectrum():
    """Guard against a test that cannot fail: the same check detects a poor subspace."""
    phi = _decaying(400, 300, decay=0.995)
    v, _, _ = randomized_svd(RowPasses(_blocks(phi, 100), 400, 300), 40, oversample=0, power_iters=0, seed=0)
    _, _, vt_ref = np.linalg.svd(phi, full_matrices=False)
    assert overlap(vt_ref[:40].T, v) < 0.99


def test_incremental_pca_matches_exact_pca():
    phi = _decaying(500, 120, seed=3)
    v, s, _ = incremental_pca(_blocks(phi, 70), 10, 120)  # 70-row blocks, 500 = 7 * 70 + 10 (short tail)
    centred = phi - phi.mean(axis=0)
    _, s_ref, vt_ref = np.linalg.svd(centred, full_matrices=False)
    assert overlap(vt_ref[:10].T, v) > 0.99
    np.testing.assert_allclose(s, s_ref[:10], rtol=1e-2)


@pytest.mark.parametrize("kernel", ["nfk", "ntk"])
def test_average_gradient_basis_and_projection(kernel):
    rng = np.random.default_rng(4)
    g = rng.standard_normal((90, 30)) + 0.5
    labels = np.repeat([0, 1, 2], 30)
    g[labels == 1] += 2.0
    sub = subspace(kernel=kernel, basis="average_gradient").fit(_blocks(g, 25), 90, 30, labels)
    phi = sub.normalizer_.transform(g)
    expected = np.stack([phi[labels == c].mean(axis=0) for c in range(3)], axis=1)
    expected /= np.linalg.norm(expected, axis=0)
    np.testing.assert_allclose(sub.components_, expected, rtol=1e-10)
    np.testing.assert_allclose(sub.transform_blocks(_blocks(g, 25), 90), phi @ expected, rtol=1e-10)


def test_subspace_save_load_roundtrip(tmp_path):
    g = _decaying(80, 50, seed=5)
    sub = subspace(k=6).fit(_blocks(g, 32), 80, 50)
    sub.save(tmp_path / "sub.npz")
    again = GradientSubspace.load(tmp_path / "sub.npz")
    np.testing.assert_array_equal(again.transform(g), sub.transform(g))
    assert again.explained_variance_ratio_.shape == (6,)


def test_projection_pass_gives_phi_sqnorm_and_the_residual_detectors():
    """One pass gives G_low and ||phi||^2; residual = ||V^T phi||^2 / ||phi||^2 and gradnorm_phi = -||phi||
    against an explicit orthogonal projection of the stored rows."""
    from lowgrad.detectors import make_detector

    g = _decaying(120, 50, seed=4)
    sub = subspace(kernel="nfk", k=5, oversample=10, power_iters=4, seed=0).fit(_blocks(g, 32), 120, 50)
    test = _decaying(30, 50, seed=5)
    g_low, sqnorm = sub.transform_blocks_with_sqnorm(_blocks(test, 7), 30)
    phi = (test - sub.normalizer_.shift_) * sub.normalizer_.scale_
    np.testing.assert_allclose(g_low, phi @ sub.components_, rtol=1e-10)
    np.testing.assert_allclose(sqnorm, (phi**2).sum(1), rtol=1e-12)

    v = sub.components_
    inside = phi @ v @ v.T  # the orthogonal projection onto span(V)
    want = (inside**2).sum(1) / (phi**2).sum(1)
    x = np.column_stack([g_low, sqnorm])
    residual = make_detector("residual", {}, True).fit(x)
    np.testing.assert_allclose(residual.score_samples(x), want, rtol=1e-9)
    assert ((want >= 0) & (want <= 1 + 1e-12)).all()
    np.testing.assert_allclose(make_detector("gradnorm_phi", {}, True).score_samples(x), -np.linalg.norm(phi, axis=1))
    # controls: a row inside the subspace scores 1, a row orthogonal to it scores 0
    inside_row = v @ np.arange(1.0, 6.0)
    outside_row = np.linalg.qr(np.column_stack([v, np.ones(50)]))[0][:, -1]
    rows = np.stack([inside_row, outside_row])
    ctrl = np.column_stack([rows @ v, (rows**2).sum(1)])
    np.testing.assert_allclose(residual.score_samples(ctrl), [1.0, 0.0], atol=1e-12)


def _skewed_rows(n: int, p: int, seed: int) -> np.ndarray:
    """Rows whose leading scores are skewed (centred exponentials) along a random orthonormal basis."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((p, 8)))
    latent = (rng.exponential(size=(n, 8)) - 1.0) * (50.0 * 0.7 ** np.arange(8))
    return latent @ basis.T + 0.01 * rng.standard_normal((n, p))


def _largest_entry_signs(v: np.ndarray) -> np.ndarray:
    """The rule ``orient_by_scores`` replaced (largest-magnitude entry of each column positive): the control."""
    return v * np.sign(v[np.abs(v).argmax(axis=0), np.arange(v.shape[1])])


@pytest.mark.parametrize("fit", ["randomized", "incremental"])
def test_column_signs_follow_the_samples_not_the_coordinates(fit):
    """The same rows in two coordinate systems (``phi`` and ``phi @ R``, R orthogonal: what a sketch changes
    against the exact route) give the same scores on the basis, signs included, and every column's scores have
    a positive third moment. The largest-entry rule, read off ``V``'s coordinates, flips some columns."""
    k = 5
    phi = _skewed_rows(400, 60, seed=5)
    rotation, _ = np.linalg.qr(np.random.default_rng(6).standard_normal((60, 60)))

    def basis(rows):
        if fit == "randomized":
            return randomized_svd(RowPasses(_blocks(rows, 64), 400, 60), k, oversample=10, power_iters=4, seed=0)[0]
        return incremental_pca(_blocks(rows, 64), k, 60)[0]

    def scores(rows, v):
        return (rows - rows.mean(axis=0) if fit == "incremental" else rows) @ v

    v, v_rotated = basis(phi), basis(phi @ rotation)
    here, there = scores(phi, v), scores(phi @ rotation, v_rotated)
    np.testing.assert_allclose(there, here, atol=1e-6 * np.abs(here).max())
    assert np.all(np.sum(here**3, axis=0) > 0)
    old_here = scores(phi, _largest_entry_signs(v))
    old_there = scores(phi @ rotation, _largest_entry_signs(v_rotated))
    assert np.any(np.sum(old_here * old_there, axis=0) < 0)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_block_moments_merge_to_the_whole_sets_mean_and_sum_of_squares(as_tensor):
    """``add_block_moments`` over uneven blocks (arrays: two passes; CPU tensors: one shifted pass) gives the float64
    mean and ``M2 = sum (x - mean)^2`` of all rows at once, far from zero mean too (where a one-pass sum of
    squares cancels). Negative control: leaving out one block changes both."""
    import torch

    from lowgrad.subspace import add_block_moments

    rng = np.random.default_rng(0)
    rows = 1e4 + rng.standard_normal((23, 7)) * np.arange(1, 8)
    expected_mean, expected_m2 = rows.mean(0), ((rows - rows.mean(0)) ** 2).sum(0)

    def moments(blocks):
        acc = None
        for b in blocks:
            acc = add_block_moments(acc, torch.from_numpy(b) if as_tensor else b)
        n, mean, m2 = acc
        return n, np.asarray(mean), np.asarray(m2)

    n, mean, m2 = moments([rows[:1], rows[1:9], rows[9:]])
    assert n == 23
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-14)
    np.testing.assert_allclose(m2, expected_m2, rtol=1e-9)
    _, mean_less, m2_less = moments([rows[:1], rows[9:]])
    assert not np.allclose(mean_less, expected_mean, rtol=1e-9) and not np.allclose(m2_less, expected_m2, rtol=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cpu_tensor_moments_take_one_shifted_pass_and_match_a_float64_two_pass(dtype, monkeypatch):
    """Float CPU tensors of any trailing shape, strided ones too, go through ``lowgrad.moments_kernel`` (counted;
    columns in several tiles and a short last one): the float64 two-pass mean and ``M2`` of the same values, far from
    zero mean, in the blocks' shape; a constant column has ``M2`` exactly 0 (``nfk_scale`` then treats it as zero
    variance); an empty block changes nothing. Negative control: the same kernel shifted by 0 instead of the running
    mean misses the tolerance (the shift is what keeps ``S2 - S1^2 / n`` from cancelling)."""
    import torch

    from lowgrad import moments_kernel
    from lowgrad.moments_kernel import TILE
    from lowgrad.subspace import _shifted_block_moments, add_block_moments

    calls = []
    kernel = moments_kernel.shifted_sums
    monkeypatch.setattr(moments_kernel, "shifted_sums", lambda *a: calls.append(a[0].shape) or kernel(*a))
    rng = np.random.default_rng(1)
    shape = (3, TILE + 700)
    rows = (1e5 + rng.standard_normal((37, *shape))).astype(dtype)
    rows[:, 1, 5] = 3.0
    values = rows.astype(np.float64)
    expected_mean, expected_m2 = values.mean(0), ((values - values.mean(0)) ** 2).sum(0)
    strided = torch.from_numpy(np.ascontiguousarray(rows.transpose(0, 2, 1))).transpose(1, 2)  # same values
    assert not strided.is_contiguous()
    acc = None
    for block in (strided[:1], torch.from_numpy(rows[1:20]), strided[20:20], strided[20:]):
        acc = add_block_moments(acc, block)
    assert calls == [(1, rows[0].size), (19, rows[0].size), (17, rows[0].size)]
    n, mean, m2 = acc
    assert n == 37 and tuple(mean.shape) == shape and tuple(m2.shape) == shape
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-14)
    np.testing.assert_allclose(m2.numpy(), expected_m2, rtol=1e-9)
    assert m2[1, 5] == 0.0
    _, _, m2_unshifted = _shifted_block_moments(torch.from_numpy(rows), np.zeros(rows[0].size))
    assert not np.allclose(m2_unshifted.numpy(), expected_m2, rtol=1e-9)
    with pytest.raises(ValueError, match="running mean"):
        _shifted_block_moments(torch.from_numpy(rows), np.zeros(5))


@pytest.mark.parametrize("block_rows", [None, 1, 7, 103, 500])
def test_passes_over_an_array_cover_each_row_once_in_order(block_rows):
    """``RowPasses.of_array``: the blocks tile the rows (an uneven last block, one block when None or larger than
    the array), and a moments pass equals NumPy's float64 mean and sum of squared deviations."""
    from lowgrad.subspace import row_blocks

    g = np.random.default_rng(2).standard_normal((103, 9)).astype(np.float32)
    passes = RowPasses.of_array(g, block_rows)
    blocks = list(passes.blocks())
    assert [b.start for b, _ in blocks] == list(range(0, 103, block_rows or 103))
    np.testing.assert_array_equal(np.concatenate([x for _, x in blocks]), g)
    assert all(np.array_equal(x, g[rows]) for rows, x in blocks) and blocks[-1][0].stop == 103
    n, mean, m2 = passes.run("moments")
    g64 = g.astype(np.float64)
    assert n == 103
    np.testing.assert_allclose(mean, g64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m2, ((g64 - g64.mean(0)) ** 2).sum(0), rtol=1e-10)
    assert len(list(row_blocks(g[:0], 4))) == 0
