"""The whole pipeline on a tiny config, in a throw-away DVC project: outputs, no-op reruns, selective
reruns, the Prefect flow, and bad input that stops with one clear line and leaves no partial artifact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from lowgrad.store import ChunkedStore

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = {
    "seed": 0,
    "device": "cpu",
    "data": {
        "image_size": 8,
        "channels": 1,
        "resize_short_side": None,
        "mean": [0.5],
        "std": [0.5],
        "datasets": {
            "id_train": {"source": "npz", "path": "data/embedded/digits.npz", "classes": [0, 1, 2], "split": "train", "max_samples": 150},
            "id_test": {"source": "npz", "path": "data/embedded/digits.npz", "classes": [0, 1, 2], "split": "test", "max_samples": 90},
            "digits_7to9": {"source": "npz", "path": "data/embedded/digits.npz", "classes": [7, 8, 9], "max_samples": 90},
        },
    },
    "model": {"arch": "small_cnn", "num_classes": 3, "checkpoint": "models/trained.pt"},
    "train": {"epochs": 6, "batch_size": 32, "lr": 0.05},
    "gradient": {"chunk_rows": 64, "batch_size": 32},
    "subspace": {"kernel": "nfk", "basis": "pca", "method": "randomized", "k": 8, "oversample": 6, "power_iters": 2},
    "scoring": {"forward": {"msp": {}, "energy": {}, "knn": {"k": 5}, "mahalanobis": {}, "odin": {}, "react": {}},
                "gradient": {"knn": {"k": 5}, "mahalanobis": {}, "energy": {}, "bats": {}, "residual": {}},
                "fusion": {"groups": [{"name": "react_grad_knn", "members": ["react", "grad_knn"]},
                                      {"name": "knn_maha_grad_residual", "members": ["knn", "mahalanobis", "grad_residual"],
                                       "rule": "fisher"}]},
                "bootstrap": {"replicates": 200}, "k_sweep": [2, 4, 8]},
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for kind in ("AUTHOR", "COMMITTER"):  # `dvc exp run` commits experiments: CI may have no git identity
        env.setdefault(f"GIT_{kind}_NAME", "ci")
        env.setdefault(f"GIT_{kind}_EMAIL", "ci@lowgrad")
    return env


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def ran_stages(proc: subprocess.CompletedProcess) -> set[str]:
    return {ln.split("'")[1] for ln in proc.stdout.splitlines() if ln.startswith("Running stage")}


def status_stages(root: Path) -> set[str]:
    """The stages ``dvc status`` lists as changed."""
    return {ln.rstrip(":").strip() for ln in dvc(root, "status").stdout.splitlines()
            if ln and not ln[0].isspace() and ln.rstrip().endswith(":")}


def make_project(dest: Path, params: dict) -> Path:
    for item in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / item, dest / item)
    for folder in ("stages", "src", "flows", "data/embedded", "architectures"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    dvc(dest, "init", "-q")
    dvc(dest, "config", "core.analytics", "false")
    return dest


def set_param(root: Path, dotted: str, value) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    node = raw
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def project(tiny_finished, tmp_path_factory) -> Path:
    """One copy of the finished tiny project for this module's tests (which run in order and build on each other)."""
    return Path(shutil.copytree(tiny_finished, tmp_path_factory.mktemp("tiny") / "p", symlinks=True))


def test_pipeline_outputs(project):
    metrics = json.loads((project / "report/metrics.json").read_text())
    assert 50.0 < metrics["id_accuracy"] <= 100.0
    assert set(metrics["methods"]) == {
        "msp", "energy", "knn", "mahalanobis", "odin", "react",
        "grad_knn", "grad_mahalanobis", "grad_energy", "grad_bats", "grad_residual",
        "fused_react_grad_knn", "fused_react_grad_knn_forward_only",
        "fused_knn_maha_grad_residual", "fused_knn_maha_grad_residual_forward_only",
    }
    assert 0.0 <= metrics["probe_accuracy"] <= 100.0
    for table in metrics["methods"].values():
        assert set(table) == {"digits_7to9", "mean"}
        assert set(table["mean"]) >= {"fpr95", "auroc", "aupr_in", "aupr_out"}
        assert 0.0 <= table["mean"]["auroc"] <= 100.0
        for values in table.values():  # an interval beside every value, containing it
            assert set(values["ci"]) == {"fpr95", "fpr95_ood_pos", "auroc", "aupr_in", "aupr_out"}
            assert all(lo <= values[m] + 1e-9 and values[m] <= hi + 1e-9 for m, (lo, hi) in values["ci"].items())
    # paired differences for every row that uses the gradient
    assert set(metrics["deltas"]) == {"grad_knn", "grad_mahalanobis", "grad_energy", "grad_bats", "grad_residual",
                                      "fused_react_grad_knn", "fused_knn_maha_grad_residual"}
    assert metrics["deltas"]["grad_knn"]["twin"]["against"] == "knn"
    assert "twin" not in metrics["deltas"]["grad_residual"]  # no forward twin
    assert metrics["deltas"]["fused_react_grad_knn"]["twin"]["against"] == "fused_react_grad_knn_forward_only"
    best = metrics["best_forward_only"]
    assert not best.startswith("grad_") and metrics["methods"][best]["mean"]["fpr95"] == min(
        t["mean"]["fpr95"] for r, t in metrics["methods"].items()
        if not r.startswith("grad_") and (not r.startswith("fused_") or r.endswith("_forward_only")))
    d = metrics["deltas"]["grad_knn"]["twin"]["mean"]["fpr95"]
    assert d["delta"] == pytest.approx(metrics["methods"]["grad_knn"]["mean"]["fpr95"] - metrics["methods"]["knn"]["mean"]["fpr95"])
    assert metrics["bootstrap"]["replicates"] == 200 and metrics["bootstrap"]["wall_s"] >= 0
    report = (project / "report/report.md").read_text()
    assert "| knn | yes |" in report and "| knn | no |" in report and "| react_grad_knn | fused |" in report
    assert "| react_grad_knn_forward_only | no (fused) |" in report
    assert report.index("## Does the gradient help here?") < report.index("## Results")
    assert "| grad_knn | twin | knn |" in report and "![paired differences](plots/deltas.png)" in report
    for png in ("roc.png", "score_histograms.png", "spectrum.png", "deltas.png"):
        assert (project / "report/plots" / png).read_bytes()[:4] == b"\x89PNG"
    g_low = np.load(project / "artifacts/projected/id_test.npy")
    assert g_low.shape == (90, 8) and np.isfinite(g_low).all()
    sqnorm = np.load(project / "artifacts/projected/id_test.sqnorm.npy")
    assert sqnorm.shape == (90,) and (sqnorm >= (g_low.astype(np.float64) ** 2).sum(1) * (1 - 1e-4)).all()
    # k-sweep: the gradient detectors on the first 2 and 4 components (8 = the fitted k is the main table)
    assert set(metrics["k_sweep"]) == {"2", "4"} and set(metrics["k_sweep"]["4"]) == {"grad_knn", "grad_mahalanobis", "grad_energy", "grad_bats", "grad_residual"}
    assert (project / "report/plots/fpr95_vs_k.png").read_bytes()[:4] == b"\x89PNG"
    # per-stage timings of every stage that ran, in the metrics and the report
    stages = {"train", "model", "factors", "subspace", "score"} | {f"{s}@{d}" for s in ("prepare", "extract", "project")
                                                           for d in ("id_train", "id_test", "digits_7to9")}
    assert set(metrics["timings"]) == stages
    # peak memory is measured per process, not a constant: positive everywhere, and the training process (torch,
    # a model, its optimiser) peaks above the one that only decodes images (an absolute floor varies by machine)
    assert all(t["wall_s"] >= 0 and t["peak_rss_mb"] > 0 for t in metrics["timings"].values())
    assert metrics["timings"]["train"]["peak_rss_mb"] > metrics["timings"]["prepare@id_train"]["peak_rss_mb"]
    assert "## Stage timings" in report and "| extract@id_train |" in report
    shown = dvc(project, "metrics", "show", "--json").stdout
    assert "grad_knn" in shown


def test_ablations_run_as_dvc_experiments(tiny_project):
    """``bench.ablations``: a variant is one ``dvc exp run`` of the base params plus its change; the table and
    ``dvc exp show`` list it, the last-block variant extracts only that block's gradients, and the stages its
    change does not reach are reused from the finished base."""
    root = tiny_project
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "base")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ablations", "--root", str(root), "--variants", "last_block"],
        cwd=ROOT, env=_env(), capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((root / "report/ablations/ablations.json").read_text())
    assert [r["experiment"] for r in results] == ["abl-last_block"]
    ran = set(results[0]["stages_run"])
    assert {"extract@id_train", "subspace", "score"} <= ran and not ran & {"prepare@id_train", "train", "model"}
    assert results[0]["overrides"]["gradient.params"] == ["conv3", "bn3", "head"]
    assert "odin" not in results[0]["metrics"]["methods"]  # forward ODIN left out of experiments by default
    store = ChunkedStore.open(root / "artifacts/extract/id_train.zarr")
    assert store.meta["param_names"][0].startswith("conv3") and store.meta["n_params"] < 14_000
    table = (root / "report/ablations/ablations.md").read_text()
    assert "| abl-last_block | `gradient.params=['conv3', 'bn3', 'head']` |" in table
    assert "abl-last_block" in dvc(root, "exp", "show", "--json").stdout


def test_rerun_is_a_noop(project):
    """Structural: a second ``dvc repro`` runs no stage (its wall time is a benchmark matter, not a test's)."""
    proc = dvc(project, "repro")
    assert ran_stages(proc) == set()


def test_changing_k_reruns_only_downstream_stages(project):
    set_param(project, "subspace.k", 6)
    ran = ran_stages(dvc(project, "repro"))
    assert ran == {"subspace", "project@id_train", "project@id_test", "project@digits_7to9", "score", "report"}
    set_param(project, "scoring.gradient.knn", {"k": 3})
    assert ran_stages(dvc(project, "repro")) == {"score", "report"}


def test_prefect_flow_runs_the_stages(project, prefect_api):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import pipeline

    with temporary_settings({PREFECT_API_URL: prefect_api}):  # the session's server (tests/conftest.py)
        summary = pipeline(overrides={"subspace.k": 5}, root=str(project))
    status = {row["stage"]: row["status"] for row in summary}
    assert status["subspace"] == "ran" and status["report"] == "ran"
    assert status["model"] == "skipped" and status["extract@id_train"] == "skipped"
    assert yaml.safe_load((project / "params.yaml").read_text())["subspace"]["k"] == 5
    # a params file that leaves a DVC-tracked key to its default gets the default written out
    raw = yaml.safe_load((project / "params.yaml").read_text())
    del raw["subspace"]["method"]
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    from flows.pipeline import apply_params

    apply_params("params.yaml", None, project)
    assert yaml.safe_load((project / "params.yaml").read_text())["subspace"]["method"] == "randomized"
    assert ran_stages(dvc(project, "repro")) == set()


def _one_error_line(proc: subprocess.CompletedProcess, pattern: str) -> None:
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode != 0
    assert len(errors) == 1 and pattern in errors[0], proc.stderr


def test_unknown_key_stops_before_any_work(tmp_path):
    params = json.loads(json.dumps(TINY))
    params["subspace"]["kk"] = 3
    root = make_project(tmp_path, params)
    proc = dvc(root, "repro", check=False)
    _one_error_line(proc, "subspace.kk: unknown key (did you mean 'k'?)")
    assert not (root / "data/prepared").exists() or not any((root / "data/prepared").glob("*.npz"))


def test_missing_checkpoint_and_wrong_shape(tmp_path):
    params = json.loads(json.dumps(TINY))
    params["model"]["checkpoint"] = "models/does_not_exist.pt"
    root = make_project(tmp_path, params)
    proc = dvc(root, "repro", "model", check=False)  # the checkpoint is a DVC dependency: DVC names it
    assert proc.returncode != 0 and "failed to reproduce 'model'" in proc.stderr and "models/does_not_exist.pt" in proc.stderr
    from flows.pipeline import apply_params  # the flow names it (and its key) before touching params.yaml

    before = (root / "params.yaml").read_text()
    with pytest.raises(Exception, match=r"checkpoint not found: models/does_not_exist.pt \(model.checkpoint\)"):
        apply_params(str(root / "params.yaml"), {"subspace.k": 4}, root)
    assert (root / "params.yaml").read_text() == before
    assert not (root / "models/model.pt").exists()
    assert "model" in dvc(root, "status").stdout  # DVC still sees the stage as to be run

    rng = np.random.default_rng(0)
    np.savez(root / "rgb32.npz", images=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), labels=-np.ones(4, np.int64))
    set_param(root, "data.datasets.rgb", {"source": "npz", "path": "rgb32.npz"})
    proc = dvc(root, "repro", "prepare@rgb", check=False)
    _one_error_line(proc, "dataset 'rgb': images are 32x32x3 but data.image_size/channels expect 8x8x1")
    assert not (root / "data/prepared/rgb.npz").exists()


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=ci@lowgrad", "-c", "user.name=ci", *args], cwd=root, check=True, capture_output=True)


def test_teammate_clone_reuses_pushed_results(project, tmp_path):
    """Clone A ran the pipeline and pushes (outputs + run cache) to a local-directory remote; clone B pulls,
    and its `dvc repro --pull` reruns nothing; B's report and artifacts equal A's."""
    remote = tmp_path / "remote"
    dvc(project, "remote", "add", "-f", "-d", "team", str(remote))
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "run A")
    dvc(project, "push", "--run-cache")
    clone = tmp_path / "clone_b"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    assert not (clone / "artifacts").exists() or not any((clone / "artifacts").rglob("*.npy"))
    proc = dvc(clone, "repro", "--pull")
    assert ran_stages(proc) == set(), proc.stdout
    assert ran_stages(dvc(clone, "repro")) == set()
    for rel in ("report/metrics.json", "report/report.md"):
        assert (clone / rel).read_text() == (project / rel).read_text()
    for name in ("id_train", "id_test", "digits_7to9"):
        np.testing.assert_array_equal(
            np.load(clone / f"artifacts/projected/{name}.npy"), np.load(project / f"artifacts/projected/{name}.npy")
        )
    assert ChunkedStore.open(clone / "artifacts/extract/id_test.zarr").read("grads").shape[0] == 90


def terminate(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a background process (a Prefect server, a serving flow): SIGTERM, then SIGKILL after ``timeout``."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, method: str = "GET", body: dict | None = None):
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _run_deployment(api: str, deployment: dict, tmp_path: Path) -> dict:
    """Trigger one run of the deployment and wait for it to complete."""
    # a busy server may answer 503 for a moment after the deployment appears: _wait retries (HTTPError is an OSError)
    run = _wait(lambda: _api(f"{api}/deployments/{deployment['id']}/create_flow_run", "POST", {}), 60, "a created run")
    final = _wait(
        lambda: (lambda s: s if s["state_type"] in ("COMPLETED", "FAILED", "CRASHED") else None)(_api(f"{api}/flow_runs/{run['id']}")),
        300, "the triggered flow run",
    )
    assert final["state_type"] == "COMPLETED", (tmp_path / "server.log").read_text()[-3000:]
    return run


def _stages_ran(api: str, run: dict) -> set[str]:
    """The stages a flow run ran (not skipped), from its 'pipeline done' log line."""
    def done_line():  # logs reach the server in batches, maybe after the run's final state: poll for it
        logs = _api(f"{api}/logs/filter", "POST", {"logs": {"flow_run_id": {"any_": [run["id"]]}},
                                                   "sort": "TIMESTAMP_DESC", "limit": 50})
        return next((log["message"] for log in logs if log["message"].startswith("pipeline done:")), None)

    listed = _wait(done_line, 60, "the run's 'pipeline done' log line").split("(", 1)[1].split(")", 1)[0]
    return set() if listed == "none" else set(listed.split(", "))


def test_scheduled_deployment_on_a_real_prefect_server(project, tmp_path, prefect_api):
    """On a real `prefect server` (the session's, on 127.0.0.1: tests/conftest.py), serve the flow with a cron
    schedule, trigger a run through the API, see it complete, shut the serving process down. Without a server,
    deploying fails loudly."""
    env = _env()
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    refused = subprocess.run([sys.executable, "-m", "flows.deploy"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "schedules need a running Prefect server" in refused.stderr

    api = env["PREFECT_API_URL"] = prefect_api
    logs = open(tmp_path / "server.log", "w")  # the serving process's output
    serve = None
    try:
        serve = subprocess.Popen([sys.executable, "-m", "flows.deploy", "--cron", "0 3 * * *", "--root", str(project)],
                                 cwd=ROOT, env=env, stdout=logs, stderr=subprocess.STDOUT)
        deployment = _wait(lambda: _api(f"{api}/deployments/name/lowgrad-pipeline/lowgrad-scheduled"), 90, "the deployment")
        crons = [s["schedule"].get("cron") for s in deployment.get("schedules", [])]
        assert "0 3 * * *" in crons
        # the model a scheduled run re-validates: a checkpoint saved again at the path the params name
        import torch

        state = torch.load(project / "models/trained.pt", weights_only=True)
        state["head.bias"] = state["head.bias"] + 0.5
        torch.save(state, project / "ckpt.pt")
        set_param(project, "model.checkpoint", "ckpt.pt")
        run = _run_deployment(api, deployment, tmp_path)
        ran = _stages_ran(api, run)  # model and everything after it reran (unchanged stages are skipped by the
        # same flow: test_prefect_flow_runs_the_stages, without a server)
        assert {"model", "extract@id_train", "subspace", "score", "report"} <= ran and not any(s.startswith("prepare") for s in ran)
        # the report as Prefect artifacts of that run, from metrics.json: the verdict (Markdown and a table) and
        # the mean-metrics table
        artifacts = {a["key"]: a for a in _api(f"{api}/artifacts/filter", "POST", {})
                     if a.get("flow_run_id") == run["id"]}
        assert artifacts["lowgrad-report"]["type"] == "markdown"
        assert "## Does the gradient help here?" in artifacts["lowgrad-report"]["data"]
        verdict = json.dumps(artifacts["lowgrad-verdict"]["data"])
        assert artifacts["lowgrad-verdict"]["type"] == "table" and "grad_knn" in verdict and "fpr95_ci" in verdict
        table = artifacts["lowgrad-mean-metrics"]
        assert table["type"] == "table" and "grad_knn" in json.dumps(table["data"]) and "fpr95_ci" in json.dumps(table["data"])
    finally:
        if serve is not None:
            terminate(serve)
        logs.close()


def test_a_run_older_than_the_familywise_readings_gets_them_by_reevaluation(tiny_finished, tmp_path):
    """bench.reevaluate on a finished run whose metrics lack the family-wise readings (as a run of older code):
    the per-comparison readings are reproduced, the family-wise ones are those the score stage gives, the report
    has the column; other bootstrap settings are refused (negative control), as is another configuration."""
    import json
    import shutil

    import yaml

    from bench.reevaluate import reevaluate
    from lowgrad.errors import LowgradError

    run = Path(shutil.copytree(tiny_finished, tmp_path / "run", symlinks=True))
    full = json.loads((run / "report/metrics.json").read_text())
    older = json.loads(json.dumps(full))
    del older["familywise"]
    for kinds in older["deltas"].values():
        for comp in kinds.values():
            for cell in comp["mean"].values():
                del cell["ci_familywise"], cell["verdict_familywise"]
    (run / "report/metrics.json").write_text(json.dumps(older))
    metrics = reevaluate(run, run / "params.yaml", tmp_path / "out")
    assert metrics["deltas"] == full["deltas"] and metrics["familywise"] == full["familywise"]
    text = (tmp_path / "out/report.md").read_text()
    assert f"Family-wise: the {full['familywise']['comparisons']} distinct comparisons" in text
    assert "not computed (metrics written before the family-wise intervals)" not in text
    raw = yaml.safe_load((run / "params.yaml").read_text())
    raw["scoring"]["bootstrap"]["seed"] = 1
    (tmp_path / "seed1.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(LowgradError, match="per-comparison readings are not reproduced"):
        reevaluate(run, tmp_path / "seed1.yaml", tmp_path / "out1")
    raw["scoring"]["bootstrap"]["seed"], raw["subspace"]["k"] = 0, 4
    (tmp_path / "k4.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(LowgradError, match="'subspace' differs from the run's own params.yaml"):
        reevaluate(run, tmp_path / "k4.yaml", tmp_path / "out2")
