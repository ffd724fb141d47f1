"""``LowGrad.fit(..., work_dir=)``: the sets' rows stream through chunked stores in a folder (:mod:`lowgrad.fit_work`).

On every route a work-directory fit scores exactly what the in-memory fit scores; its peak numpy memory stays
below one set's gradient matrix while the in-memory fit's does not; a killed fit resumes at its first unfinished
chunk; a second fit of the same inputs extracts nothing, and one of other images, another model or other code
recomputes what they changed (never a stale row); a damaged chunk or factors file is recomputed."""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from lowgrad.errors import ConfigError
from tests.test_estimator import OPTIONS, _digits, _model

ROUTES = {
    "exact": {},
    "kronecker": {"gradient": {**OPTIONS["gradient"], "sketch": "kronecker", "sketch_rank": 2, "factor_samples": 32}},
    "exact_nfk": {"gradient": {**OPTIONS["gradient"], "sketch": "exact_nfk", "sketch_dim": 128, "factor_samples": 32}},
    "dense": {"gradient": {**OPTIONS["gradient"], "sketch": "dense", "sketch_dim": 128, "factor_samples": 32}},
    "matrix_free": {"subspace": {**OPTIONS["subspace"], "method": "exact_randomized"}},
}


@pytest.fixture(scope="module")
def sets():
    x, y = _digits(n=90)
    tx, ty = _digits(n=45, offset=90)
    return x, y, tx, ty, _digits(classes=(7, 8, 9), n=20)[0]


def _fit(sets, work_dir=None, model=None, **change):
    from lowgrad import LowGrad

    x, y, tx, ty, new = sets
    det = LowGrad(model or _model(), **{**OPTIONS, **change}).fit(x, y, test=(tx, ty), work_dir=work_dir)
    return det, det.score_samples(new)


def _originals() -> dict:
    from lowgrad import extract, factors

    return {"compute": extract.Extractor.compute, "fit_factors": factors.fit_factors}


_ORIGINAL = _originals()


class _Killed(Exception):
    """The process stopping half-way (a kill leaves the same files: each chunk is written whole, then marked)."""


class _Counted:
    """Counts (and can stop at) the extractor's chunk computations and the factor fits."""

    def __init__(self, monkeypatch, stop_after: int | None = None) -> None:
        from lowgrad import extract, factors

        self.chunks = self.factor_fits = 0
        compute, fit_factors = _ORIGINAL["compute"], _ORIGINAL["fit_factors"]  # not an earlier _Counted's

        def counted_compute(extractor, rows):
            if stop_after is not None and self.chunks == stop_after:
                raise _Killed("killed")
            self.chunks += 1
            return compute(extractor, rows)

        def counted_factors(*args, **kwargs):
            self.factor_fits += 1
            return fit_factors(*args, **kwargs)

        monkeypatch.setattr(extract.Extractor, "compute", counted_compute)
        monkeypatch.setattr(factors, "fit_factors", counted_factors)


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for row in a:
        np.testing.assert_array_equal(a[row], b[row], err_msg=row)


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_work_dir_fit_scores_what_the_in_memory_fit_scores(sets, tmp_path, route):
    _, in_memory = _fit(sets, **ROUTES[route])
    det, on_disk = _fit(sets, tmp_path / "work", **ROUTES[route])
    _same(on_disk, in_memory)
    stores = sorted(p.name for p in (tmp_path / "work/artifacts/extract").iterdir())
    assert stores == ["id_test.zarr", "id_train.zarr"]
    assert (tmp_path / "work/artifacts/sketch/factors.npz").exists() == (route in ("kronecker", "exact_nfk", "dense"))
    det.save(tmp_path / "saved")  # a work-dir fit saves and reloads as any other
    from lowgrad import LowGrad

    _same(LowGrad.load(tmp_path / "saved", model=_model()).score_samples(sets[4]), in_memory)


def test_the_rows_stream_through_the_store(tmp_path):
    """Peak numpy memory of a fit of a 4,000-parameter model in chunks of 16 rows, on 200 and on 400 bank images:
    with a work directory the 200 more images cost less than a quarter of their gradient rows (200 x P float32;
    what grows is the per-image columns, the kNN distances) and the peak stays below half of the 400-image matrix;
    in memory (the negative control) the peak holds at least the matrix and grows by at least the added rows."""
    model = _model()
    n_params = sum(p.numel() for p in model.parameters())
    options = {"scoring": {"forward": {}, "gradient": {"knn": {"k": 3}}},
               "gradient": {**OPTIONS["gradient"], "chunk_rows": 16}}
    peaks = {}
    for n in (200, 400):
        x, y = _digits(n=n)
        tx, ty = _digits(n=60, offset=n)
        for where, work_dir in (("memory", None), ("work_dir", tmp_path / f"work{n}")):
            _fit((x, y, tx, ty, tx[:5]), work_dir and work_dir / "warm", model, **options)  # imports, caches
            tracemalloc.start()
            _fit((x, y, tx, ty, tx[:5]), work_dir, model, **options)
            peaks[where, n] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    added, matrix = 200 * n_params * 4, 400 * n_params * 4
    assert peaks["memory", 400] >= matrix and peaks["memory", 400] - peaks["memory", 200] >= added, peaks
    assert peaks["work_dir", 400] - peaks["work_dir", 200] < added / 4 and peaks["work_dir", 400] < matrix / 2, peaks


def test_a_killed_fit_resumes_at_its_first_unfinished_chunk(sets, tmp_path, monkeypatch):
    """90 bank images in chunks of 40 (3 chunks) and 45 test images (2): killed while computing the bank's third
    chunk, the rerun computes that chunk and the test set's two only, and scores what an unbroken fit scores."""
    _, reference = _fit(sets, **ROUTES["exact_nfk"])
    with pytest.raises(_Killed):
        _Counted(monkeypatch, stop_after=2)
        _fit(sets, tmp_path / "work", **ROUTES["exact_nfk"])
    store = tmp_path / "work/artifacts/extract/id_train.zarr"
    assert not json.loads((store / "zarr.json").read_text())["attributes"].get("complete")  # nothing half-written looks done
    counted = _Counted(monkeypatch)
    _, resumed = _fit(sets, tmp_path / "work", **ROUTES["exact_nfk"])
    assert (counted.chunks, counted.factor_fits) == (1 + 2, 0)
    _same(resumed, reference)


def test_a_second_fit_reuses_only_what_the_same_inputs_computed(sets, tmp_path, monkeypatch):
    work = tmp_path / "work"
    _fit(sets, work, **ROUTES["exact_nfk"])
    counted = _Counted(monkeypatch)
    other_rows = {"scoring": {"forward": {"knn": {"k": 5}}, "gradient": {"mahalanobis": {}}}}
    _, reused = _fit(sets, work, **ROUTES["exact_nfk"], **other_rows)  # other detectors: nothing extracted again
    assert (counted.chunks, counted.factor_fits) == (0, 0)
    _same(reused, _fit(sets, **ROUTES["exact_nfk"], **other_rows)[1])

    x, y, tx, ty, new = sets
    changed = tx.copy()
    changed[0, 0, 0, 0] ^= 1  # one bit of one test image: that set only
    counted = _Counted(monkeypatch)
    _fit((x, y, changed, ty, new), work, **ROUTES["exact_nfk"])
    assert (counted.chunks, counted.factor_fits) == (2, 0)

    model = _model()  # other weights: the factors and every chunk of both sets
    with __import__("torch").no_grad():
        model[0].weight.mul_(1.5)
    counted = _Counted(monkeypatch)
    _, other_model = _fit(sets, work, model, **ROUTES["exact_nfk"])
    assert (counted.chunks, counted.factor_fits) == (5, 1)
    _same(other_model, _fit(sets, None, model, **ROUTES["exact_nfk"])[1])

    counted = _Counted(monkeypatch)  # other subspace settings: nothing extracted again
    _, other_k = _fit(sets, work, model, **ROUTES["exact_nfk"], subspace={**OPTIONS["subspace"], "k": 4})
    assert (counted.chunks, counted.factor_fits) == (0, 0)
    _same(other_k, _fit(sets, None, model, **ROUTES["exact_nfk"], subspace={**OPTIONS["subspace"], "k": 4})[1])

    relabelled = y.copy()
    relabelled[:2] = relabelled[1::-1] if relabelled[0] != relabelled[1] else (relabelled[:2] + 1) % 3
    counted = _Counted(monkeypatch)  # other bank labels: the bank's rows (its labels column), not the factors
    _, other_labels = _fit((x, relabelled, tx, ty, new), work, model, **ROUTES["exact_nfk"])
    assert (counted.chunks, counted.factor_fits) == (3, 0)
    _same(other_labels, _fit((x, relabelled, tx, ty, new), None, model, **ROUTES["exact_nfk"])[1])

    changed_bank = x.copy()
    changed_bank[:, 0, 0, 0] ^= 1  # one bit of each bank image: its factors' kernel sample, so both sets' rows
    counted = _Counted(monkeypatch)
    _fit((changed_bank, y, tx, ty, new), work, model, **ROUTES["exact_nfk"])
    assert (counted.chunks, counted.factor_fits) == (5, 1)

    from lowgrad import saved_detector

    monkeypatch.setattr(saved_detector, "code_digests", lambda modules: {"lowgrad/extract.py": "other code"})
    counted = _Counted(monkeypatch)
    _fit(sets, work, model, **ROUTES["exact_nfk"])
    assert (counted.chunks, counted.factor_fits) == (5, 1)  # what other extraction code wrote is not trusted


def _tanh_model():
    """``_model()``'s weights and layers, but Tanh where it has ReLU: the same state_dict, another function."""
    import torch

    model = _model()
    return torch.nn.Sequential(*(torch.nn.Tanh() if isinstance(m, torch.nn.ReLU) else m for m in model))


@pytest.mark.parametrize("change", ["architecture", "seed", "normalisation", "dtype", "parameters", "batch size"])
def test_what_changes_the_rows_is_never_reused(sets, tmp_path, monkeypatch, change):
    """A work directory filled by one fit, then a fit that differs in one thing that changes the stored rows: every
    chunk and the factors are computed again, and the scores are those of an in-memory fit of the changed inputs."""
    route = "exact" if change == "batch size" else "exact_nfk"  # the exact route: no factors to carry the change
    work = tmp_path / "work"
    _fit(sets, work, **ROUTES[route])
    model, options = None, {"gradient": OPTIONS["gradient"], **ROUTES[route]}
    if change == "architecture":
        model = _tanh_model()
        assert all(__import__("torch").equal(a, b) for a, b in zip(model.state_dict().values(), _model().state_dict().values()))
    elif change == "seed":
        options["seed"] = 1
    elif change == "normalisation":
        options["data"] = {"mean": [0.4], "std": [0.5]}
    elif change == "batch size":  # another batch moves the float rounding of the rows
        options["gradient"] = {**options["gradient"], "batch_size": 4}
    elif change == "dtype":
        options["gradient"] = {**options["gradient"], "dtype": "float16"}
    else:
        options["gradient"] = {**options["gradient"], "params": ["3.weight", "3.bias", "5.weight", "5.bias"]}
    counted = _Counted(monkeypatch)
    _, scores = _fit(sets, work, model, **options)
    assert (counted.chunks, counted.factor_fits) == (5, 1)  # (on the exact route a call that fits nothing)
    _same(scores, _fit(sets, None, model, **options)[1])


def test_one_fit_at_a_time_per_work_dir(sets, tmp_path):
    from lowgrad.estimator_options import parse_options
    from lowgrad.fit_work import FitWork

    params = parse_options({**OPTIONS, "data": {**OPTIONS["data"], "image_size": 8, "channels": 1}})
    from lowgrad.fitted import classifier_of

    model, params = classifier_of(_model(), params)
    with FitWork(tmp_path / "work", params, model):  # another fit holds it
        with pytest.raises(ConfigError, match="is in use by another fit") as err:
            _fit(sets, tmp_path / "work")
        assert "\n" not in str(err.value)
    _fit(sets, tmp_path / "work")  # released

    from lowgrad import fit_work

    def broken(*args):
        raise RuntimeError("the model cannot run")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fit_work, "model_sha256", broken)
        with pytest.raises(RuntimeError, match="cannot run"):
            _fit(sets, tmp_path / "work")
    _fit(sets, tmp_path / "work")  # a fit that failed while taking the folder released it


def test_the_code_named_by_a_store_is_the_extraction_stages_code():
    """Every library module the factors and extract stages depend on (dvc.yaml) is in EXTRACTION_CODE, so a change
    to any of them makes a work directory's stores and factors be recomputed."""
    import yaml

    from lowgrad.fit_work import EXTRACTION_CODE
    from tests.conftest import ROOT

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    deps = [d for name in ("factors", "extract") for d in (stages[name].get("do", stages[name]))["deps"]]
    modules = {Path(d).stem for d in deps if d.startswith("src/lowgrad/") and "/stages/" not in d} - {"__init__"}
    assert {"subspace", "moments_kernel", "nfk_factors", "extract"} <= modules
    assert modules <= set(EXTRACTION_CODE), modules - set(EXTRACTION_CODE)


def test_damaged_chunks_and_factors_are_recomputed(sets, tmp_path, monkeypatch):
    work = tmp_path / "work"
    _, reference = _fit(sets, work, **ROUTES["exact_nfk"])
    chunk = work / "artifacts/extract/id_train.zarr/grads/c/1/0"
    raw = bytearray(chunk.read_bytes())
    raw[100] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    factors = work / "artifacts/sketch/factors.npz"
    factors.write_bytes(factors.read_bytes()[:-10])
    counted = _Counted(monkeypatch)
    _, repaired = _fit(sets, work, **ROUTES["exact_nfk"])
    assert (counted.chunks, counted.factor_fits) == (1, 1)
    _same(repaired, reference)


def test_a_project_folder_is_not_a_work_dir(sets, tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(ConfigError, match="is a lowgrad project") as err:
        _fit(sets, tmp_path)
    assert "\n" not in str(err.value)


def test_a_work_dir_that_cannot_be_one_is_one_line(sets, tmp_path, monkeypatch):
    """``~`` is the user's home; an empty name, a file, a non-path are one ConfigError line each, before any work."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _fit(sets, "~/work")
    assert (tmp_path / "home/work/artifacts/extract/id_train.zarr").is_dir()
    (tmp_path / "a_file").write_text("mine\n")
    for work_dir, fragment in (("", "must name a folder"), (5, "must name a folder"),
                               (tmp_path / "a_file", "cannot be used as a folder")):
        with pytest.raises(ConfigError, match=fragment) as err:
            _fit(sets, work_dir)
        assert "\n" not in str(err.value)
    assert (tmp_path / "a_file").read_text() == "mine\n"


def test_bad_labels_are_refused_before_the_work_dir_is_touched(sets, tmp_path, monkeypatch):
    from lowgrad.errors import DataError

    work = tmp_path / "work"
    _fit(sets, work, **ROUTES["exact_nfk"])
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and p.name != "fit.lock"}
    x, y, tx, ty, new = sets
    outside, single = y.copy(), y.copy()
    outside[0] = 7  # a 3-class model
    single[y == 2] = 1
    single[np.flatnonzero(y == 1)[0]] = 2  # class 2 has one image: no stratified calibration split
    cases = [((x, outside, tx, ty, new), "fit labels: 1 outside the model's 3 classes (0..2), first 7"),
             ((x, y, tx, np.full_like(ty, 3), new), "test labels: 45 outside the model's 3 classes"),
             ((x, single, tx, ty, new), "class 2 has one image")]
    for data, fragment in cases:
        with pytest.raises(DataError, match=re.escape(fragment)) as err:
            _fit(data, work, **ROUTES["exact_nfk"])
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="finite"):
        _fit(sets, work, **ROUTES["exact_nfk"], data={"mean": [float("nan")], "std": [0.5]})
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and p.name != "fit.lock"} == before
