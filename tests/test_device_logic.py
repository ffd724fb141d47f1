"""Device logic on this CPU (issue 40): what a GPU would change is recorded and checked, never mixed silently.

The dense sketch's ``Omega`` is drawn by the device's own generator (CUDA's ``randn`` is not the CPU's, and differs
between GPU models), so its layout names where it was drawn; a basis fitted on rows drawn on one device refuses rows
(``project``) and new images (a saved detector) drawn on another. A GPU is simulated by the name
:func:`lowgrad.dense_sketch.omega_source` gives: the refusal depends on that record alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowgrad.errors import DetectorError, StoreError
from tests.test_estimator import OPTIONS, _digits, _model

DENSE = {**OPTIONS, "gradient": {**OPTIONS["gradient"], "sketch": "dense", "sketch_dim": 64, "factor_samples": 40}}


def test_omega_source_names_the_device_and_the_gpu_model(monkeypatch):
    from lowgrad import dense_sketch

    assert dense_sketch.omega_source("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert dense_sketch.omega_source(torch.device("cuda", 0)) == "cuda (NVIDIA H100 80GB HBM3)"


def test_the_basis_keeps_its_rows_sketch_and_refuses_another(tmp_path):
    from lowgrad.subspace import GradientSubspace
    from tests.test_subspace import subspace

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(30, 12))
    sub = subspace(kernel="center", k=3, power_iters=1).fit(lambda: iter([(slice(0, 30), rows)]), 30, 12)
    cpu = {"dense_dim": 12, "block_rows": 32768, "n_params": 40, "omega_drawn_on": "cpu"}
    sub.sketch_layout_ = cpu
    sub.save(tmp_path / "subspace.npz")
    loaded = GradientSubspace.load(tmp_path / "subspace.npz")
    assert loaded.sketch_layout_ == cpu
    loaded.check_rows_from(dict(cpu), "rows drawn on the CPU")  # the same sketch passes
    with pytest.raises(StoreError, match=r"Omega depends on the device .* use cpu \(device: cpu\)") as err:
        loaded.check_rows_from({**cpu, "omega_drawn_on": "cuda (NVIDIA H100)"}, "the rows of tinyimagenet")
    assert "\n" not in str(err.value)
    with pytest.raises(StoreError, match="extract every set again with the same sketch"):
        loaded.check_rows_from({**cpu, "dense_dim": 24}, "the rows of tinyimagenet")
    exact = subspace(kernel="nfk", k=3, power_iters=1).fit(lambda: iter([(slice(0, 30), rows)]), 30, 12)
    exact.save(tmp_path / "exact.npz")  # exact rows: nothing recorded, nothing checked
    with np.load(tmp_path / "exact.npz") as z:
        assert "sketch_layout" not in z.files
    GradientSubspace.load(tmp_path / "exact.npz").check_rows_from(None, "exact rows")
    with pytest.raises(StoreError):  # negative control: sketched rows against an exact basis
        GradientSubspace.load(tmp_path / "exact.npz").check_rows_from(cpu, "sketched rows")


def test_a_dense_detector_refuses_new_images_sketched_on_another_device(tmp_path, monkeypatch):
    """Fitted and saved on the CPU; loaded where ``Omega`` would come from a GPU's generator: one line; loaded on the
    CPU again: the same scores (negative control)."""
    from lowgrad import LowGrad, dense_sketch

    x, y = _digits(n=90)
    tx, ty = _digits(n=45, offset=90)
    new = _digits(classes=(7, 8, 9), n=12)[0]
    det = LowGrad(_model(), **DENSE).fit(x, y, test=(tx, ty))
    assert det.subspace_.sketch_layout_["omega_drawn_on"] == "cpu"
    before = det.score_samples(new)
    det.save(tmp_path / "det")
    again = LowGrad.load(tmp_path / "det", model=_model()).score_samples(new)
    for row, s in before.items():
        np.testing.assert_array_equal(again[row], s, err_msg=row)
    monkeypatch.setattr(dense_sketch, "omega_source", lambda device: "cuda (NVIDIA H100 80GB HBM3)")
    with pytest.raises(DetectorError, match=r"sketched with .*cuda \(NVIDIA H100 80GB HBM3\).* the basis's rows with .*'cpu'") as err:
        LowGrad.load(tmp_path / "det", model=_model())
    assert "\n" not in str(err.value)


def test_a_dask_worker_refuses_a_store_sketched_on_another_device(monkeypatch):
    """A worker whose own device would draw another ``Omega`` than the coordinator's store records fills nothing."""
    import types

    from lowgrad import extract, scaleout
    from lowgrad.store import ChunkedStore

    layout = {"dense_dim": 64, "block_rows": 32768, "n_params": 40, "omega_drawn_on": "cpu"}
    store = types.SimpleNamespace(path="artifacts/extract/ood.zarr", meta={"sketch_layers": layout})
    filled = []
    monkeypatch.setattr(ChunkedStore, "open_for_filling", classmethod(lambda cls, path: store))
    monkeypatch.setattr(extract, "fill_chunks", lambda s, e, chunks, desc: filled.extend(chunks))
    for worker, refused in (("cpu", False), ("cuda (NVIDIA A100-SXM4-40GB)", True)):
        worker_layout = {**layout, "omega_drawn_on": worker}
        monkeypatch.setattr(extract, "build_extractor", lambda params, name, root: types.SimpleNamespace(
            gradients=types.SimpleNamespace(layout=worker_layout)))
        if refused:
            with pytest.raises(StoreError, match=r"this worker's sketch .*cuda \(NVIDIA A100.* is not the store's"):
                scaleout.extract_shard(None, "ood", [3, 4], "/tmp")
        else:
            assert scaleout.extract_shard(None, "ood", [1, 2], "/tmp")[0] == [1, 2]
    assert filled == [1, 2]


def test_the_batch_shrinks_to_what_the_device_holds(monkeypatch, caplog):
    """Shapes only, at paper sizes: ResNet-50's 25.6 M parameters on the matrix-free route at batch 128 would hold
    about 79 GB of gradient matrices; on a GPU with 80 GB free the batch becomes 70, with a warning; ResNet-18 on the
    exact route keeps its 128; one image over the whole budget is one line."""
    import logging

    from lowgrad import memory
    from lowgrad.errors import GradientError
    from lowgrad.estimator_options import parse_options

    def parse_params(raw):
        return parse_options({"data": {**OPTIONS["data"], "image_size": 8, "channels": 1}, **raw})
    from lowgrad.route import Route

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * memory.GB, 80 * memory.GB))
    gpu = torch.device("cuda", 0)
    params = parse_params({"device": "cuda", "gradient": {"batch_size": 128}, "subspace": {"method": "exact_randomized"}})
    matrix_free = Route.from_params(params)
    assert matrix_free.name == "matrix_free"
    with caplog.at_level(logging.WARNING, logger="lowgrad.memory"):
        assert matrix_free.batch_size(params, 25_557_032, gpu) == int(40 * memory.GB // (24 * 25_557_032)) == 70
    assert "batches of 70 instead" in caplog.text
    exact = Route.from_params(parse_params({"device": "cuda", "gradient": {"batch_size": 128}}))
    assert exact.batch_size(params, 11_173_962, gpu) == 128  # 17 GB: fits
    kronecker = Route.from_params(parse_params({"gradient": {"sketch": "kronecker", "batch_size": 128}}))
    assert kronecker.batch_size(params, 10**10, gpu) == 128  # never forms B x P: nothing to bound
    with pytest.raises(GradientError, match=r"one image's per-sample gradients take 44.7 GB, more than 50% of the 80.0 GB") as err:
        exact.batch_size(params, 4_000_000_000, gpu)
    assert "\n" not in str(err.value)
    host = memory.device_memory(torch.device("cpu"))  # the host's physical memory: a fixed figure, not what is free
    assert host == memory.device_memory(torch.device("cpu")) > 2**30


@pytest.mark.parametrize("options", [OPTIONS, DENSE, {**OPTIONS, "subspace": {**OPTIONS["subspace"], "method": "exact_randomized"}}],
                         ids=["exact", "dense", "matrix_free"])
def test_smaller_batches_give_the_same_scores(monkeypatch, options):
    """Every route that forms B x P gradients, fitted and scored with the device's memory made so small that only 5
    to 11 images fit per batch, by route (16 configured): the same scores as the full batches (float32 summation
    order aside), and the guard did engage (negative control: the batches seen)."""
    from lowgrad import LowGrad, memory
    from lowgrad.gradients import PerSampleGradients

    x, y = _digits(n=90)
    tx, ty = _digits(n=45, offset=90)
    new = _digits(classes=(7, 8, 9), n=12)[0]
    ref = LowGrad(_model(), **options).fit(x, y, test=(tx, ty)).score_samples(new)
    n_params = sum(p.numel() for p in _model().parameters())
    monkeypatch.setattr(memory, "device_memory", lambda device: int(5.5 * 24 * n_params / memory.SHARE))
    seen = []
    call = PerSampleGradients.__call__
    monkeypatch.setattr(PerSampleGradients, "__call__", lambda self, x: seen.append(len(x)) or call(self, x))
    small = LowGrad(_model(), **options).fit(x, y, test=(tx, ty)).score_samples(new)
    assert max(seen) < 16
    for row, s in ref.items():
        np.testing.assert_allclose(small[row], s, rtol=1e-4, atol=1e-5, err_msg=row)


def test_deterministic_mode_is_opt_in(monkeypatch):
    """``LOWGRAD_DETERMINISTIC=1`` switches torch's deterministic algorithms on and fixes cuBLAS's workspace (read by
    cuBLAS on a GPU); without it nothing changes (negative control)."""
    from lowgrad.models import pick_device

    assert not torch.are_deterministic_algorithms_enabled()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("LOWGRAD_DETERMINISTIC", raising=False)
    pick_device("cpu")
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in __import__("os").environ
    monkeypatch.setenv("LOWGRAD_DETERMINISTIC", "1")
    try:
        pick_device("cpu")
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_local_dask_workers_share_the_gpus(monkeypatch):
    """Worker ``i`` of a local cluster on a 4-GPU machine takes ``cuda:i mod 4`` (not ``cuda:0`` for all); one GPU, or
    the CPU, leaves the device alone (negative control)."""
    import types

    import distributed

    from lowgrad import models, scaleout
    from lowgrad.estimator_options import parse_options

    params = parse_options({"data": {**OPTIONS["data"], "image_size": 8, "channels": 1}, "device": "cuda"})
    taken = []
    monkeypatch.setattr(torch.cuda, "set_device", taken.append)
    monkeypatch.setattr(models, "pick_device", lambda name: torch.device("cuda" if name != "cpu" else "cpu"))
    for name, count, expected in ((5, 4, 1), (2, 4, 2), (0, 4, 0), (3, 1, None)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda count=count: count)
        monkeypatch.setattr(distributed, "get_worker", lambda name=name: types.SimpleNamespace(name=name))
        assert scaleout.pin_worker_gpu(params) == expected
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert scaleout.pin_worker_gpu(params.model_copy(update={"device": "cpu"})) is None
    assert taken == [1, 2, 0]


MATRIX_FREE = {**OPTIONS, "subspace": {**OPTIONS["subspace"], "method": "exact_randomized"}}


def test_a_saved_matrix_free_detector_reads_v_once_or_streams_it(tmp_path, monkeypatch):
    """Loaded on the matrix-free route, the saved detector reads ``V`` onto the device once, not for every scoring
    call (before: once per call); where ``V`` does not fit, every batch streams it chunk by chunk, with the same
    scores."""
    from lowgrad import LowGrad, matrix_free

    x, y = _digits(n=90)
    tx, ty = _digits(n=45, offset=90)
    batches = [_digits(classes=(7, 8, 9), n=12, offset=12 * i)[0] for i in range(3)]
    LowGrad(_model(), **MATRIX_FREE).fit(x, y, test=(tx, ty)).save(tmp_path / "det")
    reads = []
    read = matrix_free.read_components
    monkeypatch.setattr(matrix_free, "read_components", lambda arr, device: reads.append(arr.shape) or read(arr, device))
    det = LowGrad.load(tmp_path / "det", model=_model())
    resident = [det.score_samples(b) for b in batches]
    assert len(reads) == 1
    monkeypatch.setattr(matrix_free, "fits_on", lambda arr, device: False)  # as if V did not fit
    reads.clear()
    det = LowGrad.load(tmp_path / "det", model=_model())
    streamed = [det.score_samples(b) for b in batches]
    assert reads == [] and not isinstance(det._scorer._subspace.components_, torch.Tensor)
    for before, after in zip(resident, streamed):
        for row, s in before.items():
            np.testing.assert_allclose(after[row], s, rtol=1e-5, atol=1e-6, err_msg=row)


def test_float16_rows_cast_on_the_device_equal_numpys_cast():
    """extract casts a float16 store's rows where they are computed (half the bytes cross to the host): the rows an
    Extractor gives equal its float32 rows cast by NumPy, bit for bit; torch's rounding is NumPy's across the float16
    range, its subnormals and past its largest value."""
    from lowgrad.data import ImageSet
    from lowgrad.extract import Extractor
    from lowgrad.gradients import select_parameters
    from lowgrad.models import build_model

    torch.manual_seed(0)
    model = build_model("small_cnn", 3, 1).eval()
    x, y = _digits(n=20)
    rows = {}
    for dtype in ("float32", "float16"):
        extractor = Extractor(model, select_parameters(model, "all"), ImageSet(x, y), [0.5], [0.5], batch_size=8,
                              dtype=dtype, max_params=10**6, device=torch.device("cpu"))
        rows[dtype] = extractor.compute(slice(0, 20))["grads"]
    assert rows["float16"].dtype == np.float16
    np.testing.assert_array_equal(rows["float16"].view(np.uint16), rows["float32"].astype(np.float16).view(np.uint16))
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(size=20_000) * scale for scale in (1e-8, 1e-5, 1e-2, 1, 1e3, 7e4)]).astype(np.float32)
    values = np.concatenate([values, np.float32([65504, 65520, 65519.996, 6e-8, 5.9e-8, 2.9e-8, -0.0, 1e-45])])
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    np.testing.assert_array_equal(torch.from_numpy(values).to(torch.float16).numpy().view(np.uint16), expected.view(np.uint16))


@pytest.mark.parametrize("fit", ["exact_nfk", "kronecker", "dense"])
def test_the_factors_moments_stay_where_the_gradients_are(monkeypatch, fit):
    """The factors stage sums its float64 moments on the gradients' device: only the final sums are copied to the
    host (one ``.cpu()`` per moment array however many batches), not every batch's per-sample gradients (before:
    one per batch and layer, about 183 GB device-to-host for the gpu profile)."""
    from lowgrad.dense_sketch import fit_dense_nfk
    from lowgrad.gradients import select_parameters
    from lowgrad.models import build_model
    from lowgrad.nfk_factors import fit_exact_nfk, fit_kronecker_nfk

    torch.manual_seed(0)
    model = build_model("small_cnn", 3, 1).eval()
    names = select_parameters(model, "all")
    copies = {}
    cpu = torch.Tensor.cpu
    for n_batches in (1, 4):
        batches = [torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(n_batches)]
        count = [0]
        monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: count.__setitem__(0, count[0] + 1) or cpu(self, *a, **k))
        {"exact_nfk": lambda: fit_exact_nfk(model, batches, param_names=names),
         "kronecker": lambda: fit_kronecker_nfk(model, batches, param_names=names),
         "dense": lambda: fit_dense_nfk(model, names, batches)}[fit]()
        monkeypatch.setattr(torch.Tensor, "cpu", cpu)
        copies[n_batches] = count[0]
    assert copies[4] == copies[1] > 0, copies


def test_a_containers_memory_limit_bounds_the_cpu_budget(tmp_path, monkeypatch):
    """On a CPU the budget is the host's memory, or a container's cgroup limit where lower ("max": none)."""
    from lowgrad import memory

    import os

    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    monkeypatch.setattr(memory, "CGROUP_LIMITS", (str(v2), str(v1)))
    v2.write_text("max\n")
    assert memory.device_memory(torch.device("cpu")) == host
    v1.write_text(f"{2**30}\n")
    assert memory.device_memory(torch.device("cpu")) == 2**30
    v1.write_text(f"{host * 4}\n")  # a limit above the host's memory changes nothing (negative control)
    assert memory.device_memory(torch.device("cpu")) == host


def test_each_batch_comes_to_the_host_in_one_wait(monkeypatch):
    """The extraction copies a batch's results down together (``lowgrad.transfer.to_host``: page-locked, without
    blocking, one wait for the stream on CUDA): one call per batch holding every tensor of that batch, its images
    sent up through ``to_device``; the rows are those of the plain copies. Negative control: a compute that copied
    each tensor itself (as before) would make no call."""
    from lowgrad import extract, transfer
    from lowgrad.data import ImageSet
    from lowgrad.gradients import select_parameters
    from lowgrad.models import build_model

    calls, sent = [], []
    monkeypatch.setattr(extract, "to_host", lambda ts: calls.append(len(ts)) or transfer.to_host(ts))
    monkeypatch.setattr(extract, "to_device", lambda x, d: sent.append(len(x)) or transfer.to_device(x, d))
    torch.manual_seed(0)
    model = build_model("small_cnn", 3, 1).eval()
    x, y = _digits(n=20)
    names = select_parameters(model, "all")
    out = {}
    for gradients in (True, False):
        extractor = extract.Extractor(model, names, ImageSet(x, y), [0.5], [0.5], batch_size=8, dtype="float32",
                                      max_params=10**6, device=torch.device("cpu"))
        if not gradients:
            extractor.gradients = None
        out[gradients] = extractor.compute(slice(0, 20))
    assert calls == [3, 3, 3, 2, 2, 2] and sent == [8, 8, 4, 8, 8, 4]  # grads + logits + features; then forward only
    np.testing.assert_allclose(out[True]["logits"], out[False]["logits"], rtol=1e-5, atol=1e-6)  # vmap vs forward
    with torch.no_grad():
        logits = model(torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5))
    np.testing.assert_allclose(out[False]["logits"], logits.numpy(), rtol=1e-5, atol=1e-6)  # batches of 8 vs 20
    assert out[True]["grads"].shape == (20, sum(p.numel() for n, p in model.named_parameters() if n in names))


def test_to_host_refuses_tensors_of_several_devices():
    from lowgrad.transfer import to_host

    a = torch.arange(3.0)
    np.testing.assert_array_equal(to_host([a, a * 2])[1], [0.0, 2.0, 4.0])
    assert to_host([]) == []
    with pytest.raises(ValueError, match="several devices"):
        to_host([a, torch.empty(3, device="meta")])
