"""The exact-NFK route's hash (lowgrad.countsketch): the runs layout, the one-pass CPU kernel against the torch ops
every other device runs and against the CountSketch written out in float64, with negative controls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowgrad import countsketch


def _loop(formed, scale, shift, buckets, dim):
    """The definition, float64: coordinate j of row b adds scale_j * formed_bj + shift_j to bucket buckets_j."""
    f, w = formed.double().numpy(), scale.double().numpy().ravel()
    s = np.zeros_like(w) if shift is None else shift.double().numpy().ravel()
    out = np.zeros((f.shape[0], dim))
    for j, bucket in enumerate(buckets.tolist()):
        out[:, bucket] += f[:, j] * w[j] + s[j]
    return out, ((f * w + s) ** 2).sum(axis=1)


def test_runs_go_to_consecutive_buckets_and_never_collide_within_a_run():
    offsets = torch.tensor([0, 5, 9, 3])
    buckets = countsketch.bucket_index(offsets, run=4, size=14, dim=10)
    assert buckets.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4]  # the third run wraps from 9 to 0
    assert countsketch.run_length(64) == 64 and countsketch.run_length(1 << 16) == countsketch.RUN_LENGTH
    # two coordinates of different runs share a bucket with probability 1/dim, as in a CountSketch: one hash (one
    # draw of run starts) per trial, coordinate 3 of the first run against coordinate 6 of the second
    gen = torch.Generator().manual_seed(0)
    dim, run, trials = 50, 8, 20000
    starts = torch.randint(0, dim, (trials, 2), generator=gen)
    hits = sum(int(b[3] == b[run + 6]) for b in (countsketch.bucket_index(o, run, 2 * run, dim) for o in starts))
    assert abs(hits / trials - 1 / dim) < 4 * np.sqrt(1 / dim / trials), hits / trials
    # negative control: one start for every run (a broken layout) makes the pair collide whenever 3 + o == 6 + o
    same = countsketch.bucket_index(torch.tensor([7, 7]), run, 2 * run, dim)
    assert same[3] != same[run + 6] and same[3] == same[run + 3]


class _CountingPool:
    """Wraps the hash's thread pool and counts the row blocks handed to it."""

    def __init__(self, pool) -> None:
        self.pool, self.submitted = pool, 0

    def submit(self, *args, **kwargs):
        self.submitted += 1
        return self.pool.submit(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_shift", [True, False])
def test_the_kernel_is_the_countsketch_written_out(dtype, with_shift, two_threads, monkeypatch):
    """Runs that wrap past the last bucket, a last run shorter than the others, rows split over threads: the kernel,
    the torch ops and the float64 loop agree, and so do the squared norms. Negative control: other run starts
    hash elsewhere."""
    torch.manual_seed(0)
    n, p, dim, run = 7, 1000, 96, 32
    formed = torch.randn(n, p, dtype=dtype)
    scale = (torch.rand(p, dtype=dtype) + 0.5) * (torch.randint(0, 2, (p,)) * 2 - 1).to(dtype)
    shift = torch.randn(p, dtype=dtype) if with_shift else None
    offsets = torch.randint(0, dim, (-(-p // run),))
    offsets[0] = dim - 3  # the first run wraps after three buckets
    buckets = countsketch.bucket_index(offsets, run, p, dim)
    expected, expected_sq = _loop(formed, scale, shift, buckets, dim)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12

    counting = _CountingPool(countsketch._pool())
    monkeypatch.setattr(countsketch, "_pool", lambda: counting)
    hashed = torch.full((n, dim), 0.25, dtype=dtype)  # adds to what is there
    sq = countsketch.hash_rows(formed, scale, shift, offsets, run, hashed)
    assert counting.submitted == 2  # the rows were split over two threads
    np.testing.assert_allclose(hashed.double().numpy(), expected + 0.25, rtol=rtol, atol=rtol * 10)
    np.testing.assert_allclose(sq.numpy(), expected_sq, rtol=rtol)

    by_torch = torch.full((n, dim), 0.25, dtype=dtype)
    sq_torch = countsketch.hash_rows_torch(formed.clone(), scale, shift, buckets, by_torch)
    torch.testing.assert_close(by_torch, hashed, rtol=rtol, atol=rtol * 10)
    torch.testing.assert_close(sq_torch, sq, rtol=rtol, atol=0)

    torch.set_num_threads(1)  # one thread: the same rows, not split (the fixture restores the count)
    single = torch.full((n, dim), 0.25, dtype=dtype)
    countsketch.hash_rows(formed, scale, shift, offsets, run, single)
    assert counting.submitted == 2
    torch.testing.assert_close(single, hashed, rtol=0, atol=0)

    other = torch.full((n, dim), 0.25, dtype=dtype)
    countsketch.hash_rows(formed, scale, shift, (offsets + 1) % dim, run, other)
    assert not torch.allclose(other, hashed, rtol=1e-3)
    if with_shift:  # the shift is added, not ignored
        unshifted = torch.full((n, dim), 0.25, dtype=dtype)
        countsketch.hash_rows(formed, scale, None, offsets, run, unshifted)
        assert not torch.allclose(unshifted, hashed, rtol=1e-3)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_hashes_with_its_own_threads(two_threads):
    """The rows are hashed by a pool of threads; a child forked after the parent used it must not wait on the
    parent's threads, which the fork does not copy (it hangs when the pool is shared: checked by keying the pool
    without the process id)."""
    import multiprocessing

    torch.manual_seed(0)
    formed, scale = torch.randn(6, 300), torch.rand(300) + 0.5
    offsets = torch.randint(0, 64, (-(-300 // 32),))
    expected = torch.zeros(6, 64)
    countsketch.hash_rows(formed, scale, None, offsets, 32, expected)
    assert countsketch._pool_for.cache_info().currsize >= 1  # the parent's pool now exists, with its threads
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_hash_in_child, (formed, scale, offsets)).get(timeout=120)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _hash_in_child(formed, scale, offsets):
    torch.set_num_threads(2)  # split the rows over two threads, as the parent did on a 2-core machine
    out = torch.zeros(6, 64)
    countsketch.hash_rows(formed, scale, None, offsets, 32, out)
    return out


def test_inputs_the_kernel_cannot_take_are_refused():
    """Runs longer than the buckets, a wrong number of run starts, starts outside the buckets or a strided output
    would write the wrong buckets (bounds are not checked inside the kernel): each is refused."""
    formed, scale = torch.randn(2, 10), torch.ones(10)
    good = torch.tensor([0, 3, 5])
    countsketch.hash_rows(formed, scale, None, good, 4, torch.zeros(2, 6))  # the control: accepted
    with pytest.raises(ValueError, match="run starts of 8 coordinates"):
        countsketch.hash_rows(formed, scale, None, torch.tensor([0, 1]), 8, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="2 run starts of 4 coordinates for 10"):
        countsketch.hash_rows(formed, scale, None, good[:2], 4, torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"outside \[0, 6\)"):
        countsketch.hash_rows(formed, scale, None, torch.tensor([0, 3, 6]), 4, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="contiguous"):
        countsketch.hash_rows(formed, scale, None, good, 4, torch.zeros(6, 2).T)
