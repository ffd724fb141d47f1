"""The CUDA smoke suite (issue 40): what a session lent a GPU runs first (``python -m bench.device smoke``, or
``pytest -m cuda``), in well under 5 minutes on the small model of tests/test_estimator.py. Skipped here: no session of
this project has had a GPU yet, so none of these has run (docs/routes.md says so).

- every route fitted on CUDA scores as on the CPU (rtol 1e-4 on the distance-based rows, 1e-3 on the rows a trained
  probe reads), except the dense route, whose ``Omega`` is the device's own draw: there the detector fitted on the
  CPU refuses to score on CUDA, with one line;
- a detector fitted on the CPU, saved, and loaded on CUDA scores as on the CPU, and the other way round;
- the dense route fitted, saved and reloaded on CUDA scores alike there (its device-side moments, Omega and casts);
- with ``LOWGRAD_DETERMINISTIC=1`` two fits on CUDA score bit for bit alike;
- the page-locked, non-blocking copies of ``lowgrad.transfer`` equal plain ``.cpu()`` copies.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowgrad.errors import DetectorError
from tests.test_estimator import OPTIONS, _digits, _model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (the smoke suite needs a GPU)"),
]

ROUTES = {
    "exact": {},
    "kronecker": {"gradient": {"sketch": "kronecker", "sketch_rank": 4, "factor_samples": 40}},
    "exact_nfk": {"gradient": {"sketch": "exact_nfk", "sketch_dim": 512, "factor_samples": 40}},
    "matrix_free": {"subspace": {"method": "exact_randomized"}},
}
DENSE = {"gradient": {"sketch": "dense", "sketch_dim": 64, "factor_samples": 40}}


def _options(change: dict, device: str) -> dict:
    options = {**OPTIONS, "device": device}
    for section, values in change.items():
        options[section] = {**options[section], **values}
    return options


def _sets():
    x, y = _digits(n=90)
    tx, ty = _digits(n=45, offset=90)
    return (x, y), (tx, ty), _digits(classes=(7, 8, 9), n=20)[0]


def _close(a: dict, b: dict) -> None:
    for row, s in a.items():
        rtol = 1e-3 if "probe" in row or "fused" in row else 1e-4
        np.testing.assert_allclose(b[row], s, rtol=rtol, atol=1e-5, err_msg=row)


@pytest.mark.parametrize("route", list(ROUTES))
def test_every_route_on_cuda_scores_as_on_the_cpu(route):
    from lowgrad import LowGrad

    (x, y), test, new = _sets()
    cpu = LowGrad(_model(), **_options(ROUTES[route], "cpu")).fit(x, y, test=test).score_samples(new)
    gpu = LowGrad(_model(), **_options(ROUTES[route], "cuda")).fit(x, y, test=test).score_samples(new)
    _close(cpu, gpu)


@pytest.mark.parametrize("fit,load", [("cpu", "cuda"), ("cuda", "cpu")])
@pytest.mark.parametrize("route", list(ROUTES))
def test_a_detector_saved_on_one_device_scores_alike_on_the_other(route, fit, load, tmp_path):
    from lowgrad import LowGrad

    (x, y), test, new = _sets()
    det = LowGrad(_model(), **_options(ROUTES[route], fit)).fit(x, y, test=test)
    det.save(tmp_path / "det")
    _close(det.score_samples(new), LowGrad.load(tmp_path / "det", model=_model(), device=load).score_samples(new))


def test_the_dense_route_on_cuda_fits_saves_and_scores_there(tmp_path):
    """The dense route's device-side code (its moments summed on the GPU, Omega drawn there, float16 rows cast
    there): fitted on CUDA, saved and reloaded on CUDA, the same scores; its forward rows as on the CPU."""
    from lowgrad import LowGrad

    (x, y), test, new = _sets()
    options = _options({"gradient": {**DENSE["gradient"], "dtype": "float16"}}, "cuda")
    det = LowGrad(_model(), **options).fit(x, y, test=test)
    assert det.subspace_.sketch_layout_["omega_drawn_on"].startswith("cuda (")
    scores = det.score_samples(new)
    det.save(tmp_path / "det")
    again = LowGrad.load(tmp_path / "det", model=_model(), device="cuda").score_samples(new)
    for row, s in scores.items():
        np.testing.assert_array_equal(again[row], s, err_msg=row)
    cpu = LowGrad(_model(), **_options(DENSE, "cpu")).fit(x, y, test=test).score_samples(new)
    _close({row: s for row, s in cpu.items() if not row.startswith(("grad_", "fused_"))}, scores)


def test_the_dense_route_refuses_another_devices_omega(tmp_path):
    from lowgrad import LowGrad

    (x, y), test, _ = _sets()
    LowGrad(_model(), **_options(DENSE, "cpu")).fit(x, y, test=test).save(tmp_path / "det")
    with pytest.raises(DetectorError, match="Omega depends on the device"):
        LowGrad.load(tmp_path / "det", model=_model(), device="cuda")


def test_deterministic_mode_repeats_bit_for_bit(monkeypatch):
    from lowgrad import LowGrad

    monkeypatch.setenv("LOWGRAD_DETERMINISTIC", "1")
    (x, y), test, new = _sets()
    try:
        first, second = (LowGrad(_model(), **_options(ROUTES["exact_nfk"], "cuda")).fit(x, y, test=test).score_samples(new)
                         for _ in range(2))
        for row, s in first.items():
            np.testing.assert_array_equal(second[row], s, err_msg=row)
    finally:
        torch.use_deterministic_algorithms(False)


def test_page_locked_copies_equal_plain_ones():
    """``lowgrad.transfer``: the page-locked, non-blocking copies of a batch equal ``.cpu()``'s after the one wait,
    whatever runs on the stream after them (a later kernel must not change a copy already made)."""
    from lowgrad.transfer import to_device, to_host

    x = torch.randn(64, 3, 32, 32)
    on_gpu = to_device(x, torch.device("cuda"))
    assert on_gpu.is_cuda
    tensors = [on_gpu * 2, on_gpu.sum(dim=(1, 2, 3)), on_gpu.half()]
    expected = [t.cpu().numpy() for t in tensors]
    hosts = to_host(tensors)
    for t in tensors:
        t.zero_()
    for got, want in zip(hosts, expected):
        np.testing.assert_array_equal(got, want)
