"""The matrix-free exact route (``subspace.method: exact_randomized``) against an exact float64 decomposition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowgrad.data import load_dataset, to_tensor_batch
from lowgrad.gradients import PerSampleGradients
from lowgrad.matrix_free import GradientRows
from lowgrad.models import build_model
from lowgrad.subspace import GradientSubspace, nfk_scale
from tests.test_gradients import _randomise_bn
from tests.test_subspace import subspace

from tests.conftest import DIGITS

MEAN, STD = [0.5], [0.5]


def _digits(classes, n):
    from lowgrad.config import DataConfig

    data = DataConfig(image_size=8, channels=1, mean=MEAN, std=STD, datasets={
        "id_train": {"source": "npz", "path": DIGITS, "classes": [0, 1, 2]},
        "id_test": {"source": "npz", "path": DIGITS, "classes": [0, 1, 2]},
        "x": {"source": "npz", "path": DIGITS, "classes": classes, "max_samples": n},
    })
    return load_dataset("x", data, 0).images


def _model():
    torch.manual_seed(0)
    model = build_model("small_cnn", 3, 1)
    _randomise_bn(model)
    return model.eval()


def _exact_float64(model, images) -> np.ndarray:
    """Reference per-sample gradients from a float64 copy of the model, one sample at a time."""
    ref = build_model("small_cnn", 3, 1).double().eval()
    ref.load_state_dict(model.state_dict())
    x = to_tensor_batch(images, MEAN, STD).double()
    rows = []
    for i in range(len(x)):
        ref.zero_grad()
        torch.logsumexp(ref(x[i : i + 1]), dim=-1).sum().backward()
        rows.append(torch.cat([p.grad.flatten() for p in ref.parameters()]).numpy().copy())
    return np.stack(rows)


@pytest.fixture(scope="module")
def setting():
    model = _model()
    train, test = _digits([0, 1, 2], 60), _digits([7, 8], 20)
    g = _exact_float64(model, train)
    mean, var = g.mean(0), g.var(0)
    w, _ = nfk_scale(var)
    phi = (g - mean) * w
    _, s, vt = np.linalg.svd(phi, full_matrices=False)
    return {"model": model, "train": train, "test": test, "g": g, "mean": mean, "w": w, "s": s, "v": vt.T,
            "phi_test": (_exact_float64(model, test) - mean) * w}


def fit_exact_randomized(rows, kernel, k, oversample, power_iters, seed):
    """The matrix-free PCA: GradientSubspace over recomputed-gradient row passes."""
    return subspace(kernel=kernel, method="exact_randomized", k=k, oversample=oversample,
                    power_iters=power_iters, seed=seed).fit(rows)


def transform_rows(sub, rows):
    return sub.transform_blocks_with_sqnorm(rows)


def _rows(setting, images, batch_size=16):
    return GradientRows(PerSampleGradients(setting["model"], [n for n, _ in setting["model"].named_parameters()]),
                        images, MEAN, STD, batch_size)


def test_full_width_sketch_recovers_the_exact_pca(setting):
    """k + oversample >= N: the range is captured exactly, so V and the spectrum equal the exact SVD's."""
    k = 6
    sub = fit_exact_randomized(_rows(setting, setting["train"]), "nfk", k, oversample=100, power_iters=0, seed=3)
    np.testing.assert_allclose(sub.normalizer_.shift_, setting["mean"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(sub.normalizer_.scale_, setting["w"], rtol=1e-3)
    np.testing.assert_allclose(sub.singular_values_, setting["s"][:k], rtol=1e-4)
    v = sub.components_.cpu().numpy().astype(np.float64)
    np.testing.assert_allclose(np.abs(np.diag(setting["v"][:, :k].T @ v)), 1.0, atol=1e-4)
    kernel_scores = ((setting["g"] - setting["mean"]) * setting["w"]) @ v
    assert np.all(np.sum(kernel_scores**3, axis=0) > 0), "signs are decided by the kernel rows' scores"
    assert np.isclose(sub.total_sq_, (setting["s"] ** 2).sum(), rtol=1e-5)
    # the projection streams V through the recomputed test gradients
    g_low, sqnorm = transform_rows(sub, _rows(setting, setting["test"], batch_size=7))
    np.testing.assert_allclose(g_low, setting["phi_test"] @ v, rtol=1e-3, atol=1e-3 * np.abs(g_low).max())
    np.testing.assert_allclose(sqnorm, (setting["phi_test"] ** 2).sum(1), rtol=1e-4)  # ||phi||^2, same pass


def test_power_iterations_give_the_leading_subspace(setting):
    """Width well below N: with power iterations the leading components still match the exact ones."""
    k = 4
    loose = fit_exact_randomized(_rows(setting, setting["train"]), "nfk", k, oversample=2, power_iters=0, seed=1)
    tight = fit_exact_randomized(_rows(setting, setting["train"]), "nfk", k, oversample=2, power_iters=4, seed=1)
    overlap = lambda sub: float(np.linalg.norm(setting["v"][:, :k].T @ sub.components_.cpu().numpy()) ** 2 / k)  # noqa: E731
    assert overlap(tight) > 0.995
    assert overlap(tight) > overlap(loose)
    np.testing.assert_allclose(tight.singular_values_, setting["s"][:k], rtol=1e-2)


def test_ntk_kernel_uses_raw_gradients(setting):
    sub = fit_exact_randomized(_rows(setting, setting["train"]), "ntk", 3, oversample=100, power_iters=0, seed=0)
    _, s, _ = np.linalg.svd(setting["g"], full_matrices=False)
    np.testing.assert_allclose(sub.singular_values_, s[:3], rtol=1e-4)


def test_basis_round_trips_through_chunked_zarr(setting, tmp_path, monkeypatch):
    import lowgrad.subspace as subspace

    monkeypatch.setattr(subspace, "COMPONENT_CHUNK_ROWS", 100)  # several chunks
    sub = fit_exact_randomized(_rows(setting, setting["train"]), "nfk", 5, oversample=100, power_iters=0, seed=0)
    sub.save(tmp_path / "s.npz")
    lazy = GradientSubspace.load(tmp_path / "s.npz", lazy=True)
    assert lazy.components_.chunks == (100, 5) and lazy.method == "exact_randomized"
    g_low, _ = transform_rows(lazy, _rows(setting, setting["test"]))
    np.testing.assert_allclose(g_low, transform_rows(sub, _rows(setting, setting["test"]))[0], rtol=1e-6, atol=1e-6)


def test_route_through_the_pipeline_functions(tmp_path, monkeypatch):
    """extract stores no gradients; subspace and project recompute them; G_low equals the exact PCA's."""
    from lowgrad.config import parse_params
    from lowgrad.data import save_image_set
    from lowgrad.paths import EXTRACTED, MODEL, PREPARED, PROJECTED
    from lowgrad.pipeline import BODIES
    from lowgrad.store import ChunkedStore

    extract, fit_factors, fit_subspace, project = (BODIES[s] for s in ("extract", "factors", "subspace", "project"))

    monkeypatch.chdir(tmp_path)
    params = parse_params({
        "seed": 0, "device": "cpu",
        "data": {"image_size": 8, "channels": 1, "mean": MEAN, "std": STD, "datasets": {
            "id_train": {"source": "npz", "path": DIGITS, "classes": [0, 1, 2], "max_samples": 50},
            "id_test": {"source": "npz", "path": DIGITS, "classes": [0, 1, 2], "max_samples": 20},
            "ood": {"source": "npz", "path": DIGITS, "classes": [7], "max_samples": 20}}},
        "model": {"arch": "small_cnn", "num_classes": 3},
        "gradient": {"chunk_rows": 16, "batch_size": 16},
        "subspace": {"method": "exact_randomized", "k": 5, "oversample": 60, "power_iters": 1},
        "scoring": {"forward": {"msp": {}}, "gradient": {"knn": {}}},
    })
    sets = {name: load_dataset(name, params.data, 0) for name in params.data.datasets}
    for name, image_set in sets.items():
        save_image_set(PREPARED.format(name=name), image_set)
    model = _model()
    (tmp_path / "models").mkdir()
    torch.save(model.state_dict(), MODEL)
    fit_factors(params)
    for name in params.data.datasets:
        extract(params, name)
    store = ChunkedStore.open(EXTRACTED.format(name="id_train"))
    assert "grads" not in store.columns and store.meta["n_params"] == sum(p.numel() for p in model.parameters())
    fit_subspace(params)
    for name in params.data.datasets:
        project(params, name)
    g = _exact_float64(model, sets["id_train"].images)
    mean, w = g.mean(0), nfk_scale(g.var(0))[0]
    _, _, vt = np.linalg.svd((g - mean) * w, full_matrices=False)
    v = vt[:5].T
    for name in ("id_train", "ood"):
        expected = (_exact_float64(model, sets[name].images) - mean) * w @ v
        got = np.load(PROJECTED.format(name=name))
        got = got * np.sign((got * expected).sum(0))  # the exact SVD's signs are arbitrary
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_matrix_free_route_states_that_it_ignores_a_sketch():
    """exact_randomized selects the matrix-free route whatever gradient.sketch says (one key switches a route):
    the sketch is an unused setting, stated, not an error."""
    from lowgrad.config import parse_params
    from lowgrad.route import Route

    raw = {
        "data": {"image_size": 8, "channels": 1, "mean": MEAN, "std": STD, "datasets": {
            "id_train": {"source": "npz", "path": DIGITS, "classes": [0, 1]},
            "id_test": {"source": "npz", "path": DIGITS, "classes": [0, 1]},
            "ood": {"source": "npz", "path": DIGITS, "classes": [7]}}},
        "model": {"arch": "small_cnn", "num_classes": 2},
        "gradient": {"sketch": "kronecker"},
        "subspace": {"method": "exact_randomized"},
        "scoring": {"forward": {}, "gradient": {}},
    }
    route = Route.from_params(parse_params(raw))
    assert route.name == "matrix_free" and route.unused == ("gradient.sketch",)


def test_bench_routes_exact_against_stored_gradients(tmp_path):
    """``bench.routes`` runs every stage in-process for both routes; the gradient detectors agree."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    lean = ["--set", "scoring.forward={knn: {k: 5}}", "--set", "scoring.gradient={knn: {k: 5}, mahalanobis: {}}",
            "--set", "scoring.fusion.groups=[]", "--set", "scoring.k_sweep=[]", "--set", "train.epochs=5"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.routes", "--params-file", str(root / "params.yaml"), "--routes",
         "exact_randomized", "stored", "--power-iters", "3", "--workdir", str(tmp_path / "w"), "--out",
         str(tmp_path / "out"), "--bootstrap-seeds", "0,1", *lean],
        cwd=root, capture_output=True, text=True, timeout=600, check=True,
    )
    result = json.loads(proc.stdout)
    exact = result["routes"]["exact_randomized"]
    assert exact["stages"]["subspace"]["wall_s"] > 0 and (tmp_path / "out/exact_randomized/report.md").is_file()
    control = result["bootstrap_seed_control"]  # seed 0 is the params file's own: only seed 1 is redrawn
    assert control["seeds"] == [1] and len(control["between_first_and"]["stored"]) == 2
    readings = 2 * sum(len(kinds) for kinds in exact["verdicts"].values())  # row x comparison x FPR95 / AUROC
    assert 0 <= control["within"]["stored"][0] <= control["compared"] == readings > 0
    from bench.routes import reseeded_verdicts  # the stored scores, re-evaluated with the run's own seed: its verdicts

    assert reseeded_verdicts(root / "params.yaml", exact["overrides"], tmp_path / "w/exact_randomized", [0])[0] == exact["verdicts"]
    for det, cells in result["differences_from_first"]["stored"].items():
        for key, delta in cells.items():
            if key.endswith("auroc"):
                assert abs(delta) <= 1.5, (det, key, delta)


def test_bench_routes_counts_the_readings_a_route_changes():
    """``differing_readings``: a reading is a row x comparison x metric verdict; a changed verdict, a changed
    comparator and a missing row each count as differing."""
    from bench.routes import differing_readings

    def reading(verdict, ci=(-1.0, 1.0)):
        return {"delta": 0.0, "ci": list(ci), "verdict": verdict}

    def route(knn_fpr, res_against, with_res=True):
        verdicts = {"grad_knn": {"twin": {"against": "knn", "fpr95": reading(knn_fpr), "auroc": reading("worse")}}}
        if with_res:
            verdicts["grad_residual"] = {"best_forward_only": {"against": res_against, "fpr95": reading("better"),
                                                               "auroc": reading("better")}}
        return {"verdicts": verdicts}

    first = route("no detectable difference", "vim")
    same = differing_readings({"a": first, "b": route("no detectable difference", "vim")})["b"]
    assert same == {"same": 4, "compared": 4, "differing": []}
    changed = differing_readings({"a": first, "b": route("better", "knn"), "c": route("worse", "vim", False)})
    assert changed["b"]["same"] == 1 and [(d["row"], d["metric"]) for d in changed["b"]["differing"]] == [
        ("grad_knn", "fpr95"), ("grad_residual", "fpr95"), ("grad_residual", "auroc")]
    assert changed["c"]["same"] == 1 and changed["c"]["differing"][-1]["c"] is None


def test_bench_routes_bootstrap_seed_control_counts_readings_within_and_between_routes():
    """``bootstrap_seed_control``: ``within`` compares each route's redrawn verdicts with its own run,
    ``between_first_and`` the two routes at the same seed (the run's, then each redrawn one)."""
    from bench.routes import bootstrap_seed_control

    def table(knn, res):
        reading = lambda v: {"delta": 0.0, "ci": [-1.0, 1.0], "verdict": v}  # noqa: E731
        return {"grad_knn": {"twin": {"against": "knn", "fpr95": reading(knn), "auroc": reading("worse")}},
                "grad_residual": {"twin": {"against": "vim", "fpr95": reading(res), "auroc": reading("better")}}}

    nd = "no detectable difference"
    results = {"exact": {"verdicts": table("better", "better")}, "sketch": {"verdicts": table(nd, "better")}}
    reseeded = {"exact": {1: table(nd, "better"), 2: table("better", "better")},
                "sketch": {1: table(nd, nd), 2: table(nd, "better")}}
    control = bootstrap_seed_control(results, reseeded)
    assert control["seeds"] == [1, 2] and control["compared"] == 4
    assert control["within"] == {"exact": [3, 4], "sketch": [3, 4]}
    assert control["between_first_and"] == {"sketch": [3, 3, 3]}


def test_bench_routes_input_seed_keeps_the_inputs_and_redraws_the_rest(tmp_path, monkeypatch):
    """``--input-seed``: in ``run_route`` the stages that make the inputs (prepare, train) run with it, every other
    stage of the real plan with the params' seed; without it every stage takes the params' seed."""
    import json
    from pathlib import Path

    from bench import routes
    from lowgrad import paths, pipeline

    root = Path(__file__).resolve().parents[1]
    real_plan = pipeline.stage_bodies
    seen: dict[str, int] = {}

    def recording_plan(params, where):
        def body(name):
            def run(stage_params, *args):
                seen[name] = stage_params.seed
                assert stage_params.model_dump() == {**params.model_dump(), "seed": stage_params.seed}  # only the seed
                if name == "report":  # what run_route reads back
                    Path(paths.METRICS).parent.mkdir(parents=True, exist_ok=True)
                    Path(paths.METRICS).write_text(json.dumps({
                        "methods": {}, "rows": {}, "deltas": {}, "samples": {"id_test": 1}, "id_accuracy": 1.0,
                        "bootstrap": {"replicates": 10, "seed": 0, "level": 0.95}}))
            return run
        return [(name, body(name), args) for name, _, args in real_plan(params, where)]

    monkeypatch.setattr(pipeline, "stage_bodies", recording_plan)
    monkeypatch.chdir(root)
    result = routes.run_route(root / "params.yaml", {"seed": 7}, tmp_path / "w", input_seed=3)
    bases = {name.partition("@")[0] for name in seen}
    assert {"prepare", "train", "model", "extract", "score", "report"} <= bases  # the real plan's stage names
    assert {n: s for n, s in seen.items() if n.partition("@")[0] in ("prepare", "train")} == \
        {n: 3 for n in seen if n.partition("@")[0] in ("prepare", "train")}
    assert {s for n, s in seen.items() if n.partition("@")[0] not in ("prepare", "train")} == {7}
    assert result["seeds"] == {"inputs": 3, "method": 7}
    seen.clear()  # negative control: without an input seed every stage takes the params' seed
    routes.run_route(root / "params.yaml", {"seed": 7}, tmp_path / "w2")
    assert set(seen.values()) == {7}


def test_bench_routes_counts_the_readings_shared_with_an_earlier_run():
    """``readings_against_earlier``: an earlier run's metrics.json (its ``deltas``) against each route of this run;
    a changed verdict, a changed baseline and a missing row each differ; another protocol is refused."""
    from bench.routes import readings_against_earlier

    def reading(verdict):
        return {"delta": 0.0, "ci": [-1.0, 1.0], "verdict": verdict}

    nd = "no detectable difference"
    protocol = {"samples": {"id_test": 10, "ood": 5}, "bootstrap": {"replicates": 100, "seed": 0, "level": 0.95}}
    earlier = {**protocol, "deltas": {
        "grad_knn": {"twin": {"against": "knn", "mean": {"fpr95": reading("better"), "auroc": reading(nd)},
                              "ood": {"fpr95": reading("better"), "auroc": reading(nd)}}},
        "grad_residual": {"best_forward_only": {"against": "vim", "mean": {"fpr95": reading("better"), "auroc": reading(nd)}}}}}

    def run(knn_fpr, residual_against):
        verdicts = {"grad_knn": {"twin": {"against": "knn", "fpr95": reading(knn_fpr), "auroc": reading(nd)}}}
        if residual_against is not None:
            verdicts["grad_residual"] = {"best_forward_only": {"against": residual_against, "fpr95": reading("better"),
                                                               "auroc": reading(nd)}}
        return {**protocol, "verdicts": verdicts}

    counted = readings_against_earlier(earlier, {"exact": run("better", "vim"), "sketch": run(nd, "knn"),
                                                 "lean": run("better", None)})
    assert (counted["exact"]["same"], counted["exact"]["compared"]) == (4, 4)
    sketch = counted["sketch"]
    assert sketch["same"] == 1 and [(d["row"], d["metric"]) for d in sketch["differing"]] == [
        ("grad_knn", "fpr95"), ("grad_residual", "fpr95"), ("grad_residual", "auroc")]
    assert sketch["differing"][0]["earlier"]["verdict"] == "better" and sketch["differing"][0]["sketch"]["verdict"] == nd
    assert sketch["differing"][1]["sketch"] is None  # another baseline: not the same comparison
    assert counted["lean"]["same"] == 2 and counted["lean"]["differing"][-1]["lean"] is None
    other = {**run("better", "vim"), "samples": {"id_test": 11, "ood": 5}}
    with pytest.raises(ValueError, match="not this protocol"):
        readings_against_earlier(earlier, {"exact": other})


def test_tall_qr_spans_numpy_qr_and_never_factorises_the_whole_matrix(monkeypatch):
    """CholeskyQR2 in row blocks (issue 40): Q orthonormal to float32 rounding, Q R = A, the same column space as
    numpy.linalg.qr, from blocks of a few rows (no torch QR called), also at a condition number of 1e6; linearly
    dependent columns are one error line (the negative control)."""
    from lowgrad import matrix_free
    from lowgrad.matrix_free import tall_qr

    def no_qr(*args, **kwargs):
        raise AssertionError("torch.linalg.qr called on the tall matrix")

    monkeypatch.setattr(torch.linalg, "qr", no_qr)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5000, 40)) @ np.diag(np.logspace(0, 3, 40))  # condition number 1e3
    q, r = tall_qr(torch.from_numpy(a.astype(np.float32)), block_rows=777)
    q64 = q.double().numpy()
    np.testing.assert_allclose(q64.T @ q64, np.eye(40), atol=1e-5)
    np.testing.assert_allclose(q64 @ r.double().numpy(), a, rtol=0, atol=1e-3 * np.abs(a).max())
    ref = np.linalg.qr(a)[0]
    np.testing.assert_allclose(np.abs(ref.T @ q64), np.eye(40), atol=1e-4)  # the same columns up to sign
    # negative control: dependent columns (a zero one) are refused in one line, not returned as a broken Q
    from lowgrad.errors import GradientError

    b = a.copy()
    b[:, 1] = 0.0
    with pytest.raises(GradientError, match="40 columns are linearly dependent"):
        tall_qr(torch.from_numpy(b.astype(np.float32)), block_rows=1000)
    c = rng.standard_normal((5000, 40)) @ np.diag(np.logspace(0, 6, 40))  # condition number 1e6: still orthonormal
    qc, _ = tall_qr(torch.from_numpy(c.astype(np.float32)), block_rows=1000)
    np.testing.assert_allclose(qc.double().numpy().T @ qc.double().numpy(), np.eye(40), atol=1e-4)
    assert matrix_free.QR_BLOCK_ROWS * 220 < 2**31  # one block of the paper's P x 220 stays far below 2^31 elements
