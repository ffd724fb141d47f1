"""flows/monitor.py on a real Prefect server (the session's, tests/conftest.py): the scheduled deployment scores an
ID batch and an OOD batch with the tiny run's saved detector; the OOD batch is over the bound and fails the run
visibly, the ID batch is not; the detector is never refitted (its files' hash is unchanged); a batch scored before
is not scored again, one replaced in place is, and a broken one is one error line, counted as failed and retried;
a new detector (a rerun of score), other rows or another bound score every batch again."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lowgrad.paths import sha256
from tests.test_pipeline import ROOT, _api, _env, _wait, terminate

pytestmark = pytest.mark.slow
ROWS = ["grad_residual", "fused_knn_maha_grad_residual"]
BOUND = 0.3


def _final(api: str, run_id: str) -> dict:
    return _wait(lambda: (lambda s: s if s["state_type"] in ("COMPLETED", "FAILED", "CRASHED") else None)(
        _api(f"{api}/flow_runs/{run_id}")), 300, "the monitoring run")


def test_monitoring_deployment_flags_the_ood_batch_and_never_refits(tiny_finished, tmp_path, prefect_api, monkeypatch):
    watch = tmp_path / "incoming"
    watch.mkdir()
    for batch, source in (("id_batch", "id_test"), ("ood_batch", "digits_7to9")):
        with np.load(tiny_finished / f"data/prepared/{source}.npz") as z:
            np.savez(watch / f"{batch}.npz", images=z["images"][:60])
    detector_digest = sha256(tiny_finished / "artifacts/detector")
    env = {**_env(), "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect")}
    for args, fragment in ((["--rows", "grad_residual,nope"], "error: unknown row(s) nope: the run has msp"),
                           (["--bound", "5"], "error: bound 5.0: a fraction of a batch")):  # refused before serving
        refused = subprocess.run([sys.executable, "-m", "flows.monitor", "--run", str(tiny_finished), "--watch",
                                  str(watch), *args, "--every", "3600"], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode == 1 and refused.stderr.startswith(fragment) and refused.stderr.count("\n") == 1
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([sys.executable, "-m", "flows.monitor", "--run", str(tiny_finished), "--watch", str(watch),
                              "--rows", ",".join(ROWS), "--bound", str(BOUND), "--every", "3600"],
                             cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deployment = _wait(lambda: _api(f"{prefect_api}/deployments/name/lowgrad-monitor/lowgrad-monitor"), 90,
                           "the monitoring deployment")
        assert [s["schedule"].get("interval") for s in deployment["schedules"]] == [3600.0]
        run = _wait(lambda: _api(f"{prefect_api}/deployments/{deployment['id']}/create_flow_run", "POST", {}), 60, "a run")
        final = _final(prefect_api, run["id"])
    finally:
        terminate(serve)
        log.close()
    assert final["state_type"] == "FAILED", (tmp_path / "serve.log").read_text()[-3000:]
    assert "over the bound 30 % in ood_batch.npz" in final["state"]["message"]
    results = {b: json.loads((watch / ".lowgrad-monitor" / f"{b}.npz.json").read_text()) for b in ("id_batch", "ood_batch")}
    for row in ROWS:
        assert results["id_batch"]["rows"][row]["flagged_fraction"] <= BOUND
        assert results["ood_batch"]["rows"][row]["flagged_fraction"] > BOUND
        assert results["ood_batch"]["rows"][row]["p_value_vs_id"] < 1e-6 < results["id_batch"]["rows"][row]["p_value_vs_id"]
        histogram = results["ood_batch"]["rows"][row]["histogram"]
        assert sum(histogram["batch"]) == 60 and sum(histogram["id_test"]) == 90  # the run's id_test
    assert results["id_batch"]["over_bound"] == [] and set(results["ood_batch"]["over_bound"]) == set(ROWS)
    assert (watch / ".lowgrad-monitor/ood_batch.npz.png").stat().st_size > 10_000
    artifacts = {a["key"]: a for a in _api(f"{prefect_api}/artifacts/filter", "POST", {}) if a.get("flow_run_id") == run["id"]}
    assert {"lowgrad-monitor", "lowgrad-monitor-id-batch-npz", "lowgrad-monitor-ood-batch-npz"} <= set(artifacts)
    assert "over the bound" in artifacts["lowgrad-monitor"]["data"]
    assert sha256(tiny_finished / "artifacts/detector") == detector_digest  # scored with, never refitted

    # again: nothing new, nothing scored; then one batch replaced in place and one broken batch
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.monitor import monitor

    from tests.test_detector_api import _no_fitting

    _no_fitting(monkeypatch)  # in this process, any refit raises
    written = {p.name: p.stat().st_mtime_ns for p in (watch / ".lowgrad-monitor").iterdir()}
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        again = monitor(str(tiny_finished), str(watch), ROWS, BOUND)
        assert again == {"scored": [], "skipped": ["id_batch.npz", "ood_batch.npz"]}
        assert {p.name: p.stat().st_mtime_ns for p in (watch / ".lowgrad-monitor").iterdir()} == written
        with np.load(tiny_finished / "data/prepared/id_test.npz") as z:
            np.savez(watch / "id_batch.npz", images=z["images"][:30])  # same name, new content
        (watch / "broken.npz").write_bytes(b"not an archive")
        state = monitor(str(tiny_finished), str(watch), ROWS, BOUND, return_state=True)
    assert state.is_failed() and "broken.npz: " in state.message and "not a readable .npz file" in state.message
    assert json.loads((watch / ".lowgrad-monitor/id_batch.npz.json").read_text())["images"] == 30  # rescored
    assert (watch / ".lowgrad-monitor/ood_batch.npz.json").stat().st_mtime_ns == written["ood_batch.npz.json"]

    # the broken batch is a failed batch, counted and retried (never "scored before"); the good ones are kept
    assert "1 of 2 batch(es) failed: broken.npz: " in state.message
    broken = json.loads((watch / ".lowgrad-monitor/broken.npz.json").read_text())
    assert broken["detector"] == sha256(tiny_finished / "artifacts/detector/detector.json") and "error" in broken
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        retried = monitor(str(tiny_finished), str(watch), ROWS, BOUND, return_state=True)
    assert retried.is_failed() and "1 of 1 batch(es) failed: broken.npz" in retried.message
    (watch / "broken.npz").unlink()
    (watch / ".lowgrad-monitor/broken.npz.json").unlink()

    # a channels-first batch beside a good one: the good one is scored, the bad one is one line, the run says 1 failed
    np.savez(watch / "channels_first.npz", images=np.zeros((4, 1, 8, 8), np.uint8))
    with np.load(tiny_finished / "data/prepared/id_test.npz") as z:
        np.savez(watch / "good.npz", images=z["images"][:20])
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        mixed = monitor(str(tiny_finished), str(watch), ROWS, BOUND, return_state=True)
    assert mixed.is_failed() and "1 of 2 batch(es) failed: channels_first.npz: " in mixed.message
    assert "(channels first? store them as N x H x W x C)" in mixed.message
    assert json.loads((watch / ".lowgrad-monitor/good.npz.json").read_text())["images"] == 20
    (watch / "channels_first.npz").unlink()


def test_the_monitor_rescores_under_a_new_detector_or_other_settings(tiny_project, tmp_path, prefect_api):
    """A rerun of ``score`` with another option makes a new detector: the next monitor run scores every batch again
    and its records name the new detector's digest; other rows or another bound do the same; the same settings
    again score nothing (the negative control)."""
    import yaml
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.monitor import monitor

    run = tiny_project
    watch = tmp_path / "incoming"
    watch.mkdir()
    with np.load(run / "data/prepared/digits_7to9.npz") as z:
        np.savez(watch / "ood.npz", images=z["images"][:40])
    records = watch / ".lowgrad-monitor/ood.npz.json"
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        monitor(str(run), str(watch), ["knn"], 1.0)
        first = json.loads(records.read_text())
        assert monitor(str(run), str(watch), ["knn"], 1.0)["skipped"] == ["ood.npz"]  # same settings: nothing new
        params = yaml.safe_load((run / "params.yaml").read_text())
        params["scoring"]["forward"]["knn"]["k"] = 2 * params["scoring"]["forward"]["knn"].get("k", 5)
        (run / "params.yaml").write_text(yaml.safe_dump(params))
        rerun = subprocess.run([sys.executable, "-m", "stages.score"], cwd=run, env=_env(), capture_output=True,
                               text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        new_digest = sha256(run / "artifacts/detector/detector.json")
        assert new_digest != first["detector"]
        assert monitor(str(run), str(watch), ["knn"], 1.0)["scored"] == ["ood.npz"]
        second = json.loads(records.read_text())
        assert second["detector"] == new_digest and second["rows"]["knn"]["threshold"] != first["rows"]["knn"]["threshold"]
        assert monitor(str(run), str(watch), ["knn", "msp"], 1.0)["scored"] == ["ood.npz"]  # other rows
        assert monitor(str(run), str(watch), ["knn", "msp"], 0.9)["scored"] == ["ood.npz"]  # another bound
        assert json.loads(records.read_text())["watched_rows"] == ["knn", "msp"]
        assert monitor(str(run), str(watch), ["knn", "msp"], 0.9)["skipped"] == ["ood.npz"]


def test_the_monitor_scores_on_the_device_it_is_given(tmp_path, monkeypatch):
    """``--device`` reaches the flow and its detector (default cpu): a dense-route run fitted on a GPU is scored
    on one, where its Omega was drawn (docs/routes.md)."""
    import types

    import flows.monitor as mon
    import flows.server

    source = __import__("inspect").getsource(mon.monitor.fn)
    seen = []
    monkeypatch.setattr(mon, "check_settings", lambda run, rows, bound: None)
    monkeypatch.setattr(mon, "batches", lambda watch, out: [])
    monkeypatch.setattr(flows.server, "start_temporary_server", lambda: None)
    monkeypatch.setattr(mon, "monitor", lambda return_state=False, **kw: seen.append(kw["device"])
                        or types.SimpleNamespace(is_completed=lambda: True))
    for extra, device in (([], "cpu"), (["--device", "cuda"], "cuda")):
        mon.main(["--run", str(tmp_path), "--watch", str(tmp_path), "--once", *extra])
    assert seen == ["cpu", "cuda"]
    assert "OODDetector.load(run, device=device)" in source  # and the flow hands it to the detector
