"""Hardening: one-line user errors that are never retried, the whole-run lock, non-finite models refused,
signals, live progress, Prefect artifacts. Each test names the finding it covers (issue: hardening 1-9)."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from lowgrad.config import ConfigError, load_params, parse_params, parse_yaml
from lowgrad.runlock import RunLock, RunLockedError
from tests.test_pipeline import TINY, _env, dvc, make_project, set_param

from tests.conftest import DIGITS

ROOT = Path(__file__).resolve().parents[1]


def _tiny(tmp_path: Path, **changes) -> Path:
    params = json.loads(json.dumps(TINY))
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return make_project(tmp_path, params)


def _stage(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=root, env=_env(), capture_output=True, text=True, timeout=300)


def _one_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 1 (``dvc`` itself: non-zero), exactly one ``error:`` line holding every fragment, no traceback."""
    out = proc.stdout + proc.stderr
    errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == (1 if "dvc" not in proc.args[1:3] else proc.returncode or 1), out
    assert len(errors) == 1, out
    assert all(f in errors[0] for f in fragments), errors[0]
    assert "Traceback" not in out, out
    return errors[0]


def _flow(root: Path, *args: str, api: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m flows.pipeline`` in ``root``: against the Prefect server at ``api``, or (None) with the
    temporary server it starts itself."""
    env = {**_env(), "PREFECT_HOME": str(root / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    if api is not None:
        env["PREFECT_API_URL"] = api
    return subprocess.run([sys.executable, "-m", "flows.pipeline", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)


# -- 1: two flows in one checkout ------------------------------------------------------------------------------
def test_run_lock_refuses_a_second_run_and_takes_over_a_dead_ones(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lowgrad.runlock import RunLock\n"
                               f"with RunLock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"PID {holder.pid}, started 20"):
            RunLock(tmp_path).acquire()
        got = []
        waiter = threading.Thread(target=lambda: got.append(RunLock(tmp_path, wait=True).acquire()))
        waiter.start()
        time.sleep(1.0)
        assert not got  # still waiting while the holder runs
    finally:
        holder.kill()  # a killed holder: the kernel drops its flock, its record stays behind
        holder.wait()
    waiter.join(30)
    assert got and json.loads((tmp_path / ".dvc/tmp/lowgrad-run.lock").read_text())["pid"] == os.getpid()
    got[0].release()
    # a record left by a dead process (no lock held) is taken over with a warning
    (tmp_path / ".dvc/tmp/lowgrad-run.lock").write_text(json.dumps({"pid": 999999, "started": "yesterday"}))
    with caplog.at_level(logging.WARNING, logger="lowgrad.runlock"):
        with RunLock(tmp_path):
            pass
    assert "taking over the run lock left by PID 999999" in caplog.text
    assert (tmp_path / ".dvc/tmp/lowgrad-run.lock").read_text() == ""  # released cleanly: empty record


def test_second_flow_in_the_checkout_is_refused_and_changes_nothing(tmp_path):
    root = _tiny(tmp_path)
    before = (root / "params.yaml").read_text()
    holder = subprocess.Popen([sys.executable, "-c", "import time; from lowgrad.runlock import RunLock\n"
                               f"with RunLock({str(root)!r}):\n    print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = _flow(root, "--set", "subspace.k=4")
    finally:
        holder.kill()
        holder.wait()
    _one_error(proc, "another lowgrad run holds this checkout", f"PID {holder.pid}", "--wait")
    assert (root / "params.yaml").read_text() == before  # the refused run wrote nothing
    assert not (root / "data/prepared").exists()
    assert not (root / ".prefect/temporary-server.log").exists()  # refused before a Prefect server was started


# -- 2: non-finite models ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tensor", ["head.weight", "bn2.running_var"])
def test_model_stage_refuses_non_finite_checkpoints(tmp_path, tensor):
    from lowgrad.models import build_model

    root = _tiny(tmp_path)
    state = build_model("small_cnn", 3, 1).state_dict()
    state[tensor][0] = float("nan")
    torch.save(state, root / "nan.pt")
    set_param(root, "model.checkpoint", "nan.pt")
    proc = dvc(root, "repro", "model", check=False)
    _one_error(proc, "nan.pt", f"tensor '{tensor}'", "non-finite")
    assert not (root / "models/model.pt").exists()


def test_diverging_training_stops_at_the_first_non_finite_loss(tmp_path):
    root = _tiny(tmp_path, **{"train.lr": 1e6})
    _one_error(dvc(root, "repro", "model", check=False), "training diverged", "lower train.lr")
    assert not (root / "models/model.pt").exists()


def test_zero_std_is_a_config_error():
    raw = json.loads(json.dumps(TINY))
    raw["data"]["std"] = [0]
    with pytest.raises(ConfigError, match=r"data.std.0: Input should be greater than 0"):
        parse_params(raw)


# -- 3 / 4: input errors, never repaired -----------------------------------------------------------------------
def _bad_npz(root: Path, kind: str) -> str:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 8, 8, 1), dtype=np.uint8)
    labels = np.zeros(50, np.int64)
    path = root / f"{kind}.npz"
    if kind == "truncated":
        np.savez(path, images=images, labels=labels)
        path.write_bytes(path.read_bytes()[:-300])
    elif kind == "crc":
        np.savez(path, images=images, labels=labels)
        raw = bytearray(path.read_bytes())
        raw[200] ^= 0xFF  # inside the first member's data: a CRC mismatch when read
        path.write_bytes(bytes(raw))
    elif kind == "npy":
        path = root / "npy.npz"
        with open(path, "wb") as fh:
            np.save(fh, images)
    elif kind == "more_labels":
        np.savez(path, images=images, labels=np.zeros(100, np.int64))
    elif kind == "fewer_labels":
        np.savez(path, images=np.concatenate([images, images]), labels=labels)
    elif kind == "labels_2d":
        np.savez(path, images=images, labels=np.zeros((50, 2), np.int64))
    elif kind == "float_labels":
        np.savez(path, images=images, labels=np.full(50, 5.7))
    elif kind == "empty":
        np.savez(path, images=images[:0], labels=labels[:0])
    return path.name


@pytest.mark.parametrize("kind, fragments", [
    ("truncated", ["truncated.npz", "truncated or corrupt"]),
    ("crc", ["crc.npz", "truncated or corrupt"]),
    ("npy", ["npy.npz", "a single .npy array"]),
    ("more_labels", ["50 images but 100 labels"]),
    ("fewer_labels", ["100 images but 50 labels"]),
    ("labels_2d", ["'labels' must be 1-D"]),
    ("float_labels", ["labels must be integers, found 5.7"]),
    ("empty", ["holds no images"]),
])
def test_bad_dataset_files_give_one_error_line(tmp_path, kind, fragments):
    root = _tiny(tmp_path)
    set_param(root, "data.datasets.bad", {"source": "npz", "path": _bad_npz(root, kind)})
    _one_error(_stage(root, "stages.prepare", "bad"), *fragments)
    assert not (root / "data/prepared/bad.npz").exists()


def test_split_of_an_empty_selection_and_yaml_errors(tmp_path):
    root = _tiny(tmp_path)
    raw = (root / "params.yaml").read_text()
    rng = np.random.default_rng(0)
    np.savez(root / "single.npz", images=rng.integers(0, 256, (1, 8, 8, 1), dtype=np.uint8), labels=np.zeros(1, np.int64))
    set_param(root, "data.datasets.one", {"source": "npz", "path": "single.npz", "split": "train"})
    _one_error(_stage(root, "stages.prepare", "one"), "dataset 'one': cannot split 1 images")
    (root / "params.yaml").write_text(raw + "\nseed: [1,\n")
    _one_error(_stage(root, "stages.prepare", "id_train"), "params.yaml: not valid YAML (line")
    (root / "params.yaml").write_text(raw.replace("  datasets:\n", "  datasets:\n    digits_7to9: {source: npz, path: data/embedded/digits.npz}\n", 1))
    _one_error(_stage(root, "stages.prepare", "id_train"), "duplicate key 'digits_7to9'")


def test_read_only_artifacts_give_one_error_line(tmp_path):
    if os.geteuid() == 0:  # root ignores file permissions: make the target path a file instead of a directory
        root = _tiny(tmp_path)
        (root / "data").mkdir(exist_ok=True)  # data/embedded is there already
        (root / "data/prepared").write_text("not a directory")
    else:
        root = _tiny(tmp_path)
        (root / "data/prepared").mkdir(parents=True)
        (root / "data/prepared").chmod(0o500)
    _one_error(_stage(root, "stages.prepare", "id_train"), "cannot access", "data/prepared")


# -- 5 / 6: options checked with the config -------------------------------------------------------------------
@pytest.mark.parametrize("change, fragment", [
    ({"scoring.forward.knn": {"k": "five"}}, "scoring.forward.knn.k: Input should be a valid integer"),
    ({"scoring.forward.knn": {"k": -1}}, "scoring.forward.knn.k: Input should be greater than or equal to 1"),
    ({"scoring.forward.react": {"percentile": 200}}, "scoring.forward.react.percentile: Input should be less than or equal to 100"),
    ({"scoring.forward.odin": {"temperature": 0}}, "scoring.forward.odin.temperature: Input should be greater than 0"),
    ({"subspace.k": True}, "subspace.k: Input should be a valid integer"),
    ({"subspace.k": "40"}, "subspace.k: Input should be a valid integer"),
    ({"data.datasets.mean": {"source": "npz", "path": DIGITS}}, "dataset name 'mean' is reserved"),
])
def test_bad_options_and_reserved_names_are_config_errors(change, fragment):
    with pytest.raises(ConfigError) as err:
        load_params(ROOT / "params.yaml", change)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_duplicate_keys_are_refused():
    with pytest.raises(ConfigError, match=r"duplicate key 'knn' \(line 4\)"):
        parse_yaml("scoring:\n  forward:\n    knn: {k: 5}\n    knn: {k: 6}\n", "p")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_yaml("a: [1,\n", "p")


# -- 3 / 5 through the flow: one attempt, the stage's error line in the final message ---------------------------
def test_flow_user_errors_are_not_retried_and_keep_the_stage_line(tmp_path, prefect_api):
    root = _tiny(tmp_path)
    set_param(root, "data.datasets.bad", {"source": "npz", "path": _bad_npz(root, "truncated")})
    proc = _flow(root, api=prefect_api)
    line = _one_error(proc, "stage 'prepare@bad' failed", "truncated.npz", "truncated or corrupt")
    assert "AwaitingRetry" not in proc.stdout + proc.stderr and "Retrying" not in proc.stdout + proc.stderr
    assert (proc.stdout + proc.stderr).count("[prepare@bad") >= 1  # the stage's own lines were streamed
    assert line.count("error:") == 1
    # K larger than the bank: refused once id_train is prepared, before the model and any extraction
    set_param(root, "data.datasets", {k: v for k, v in TINY["data"]["datasets"].items()})
    set_param(root, "scoring.forward.knn", {"k": 100000})
    proc = _flow(root, api=prefect_api)
    _one_error(proc, "scoring.forward.knn.k = 100000 exceeds the bank size: id_train has 150 samples")
    assert not (root / "artifacts/extract").exists() and "[extract@" not in proc.stdout + proc.stderr


def test_the_temporary_server_writes_to_its_log_and_not_to_the_terminal(tmp_path):
    """Prefect's server output (a shutdown race can print a sqlalchemy traceback) goes to a log file; the
    flow's own stdout/stderr stay the terminal's."""
    code = ("import os, psutil\n"
            "from prefect.server.api.server import SubprocessASGIServer\n"
            "import flows.pipeline  # a flow module: Prefect's logging is set up, as where the flows start it\n"
            "from flows.server import start_temporary_server\n"
            "log = start_temporary_server()\n"
            "server = psutil.Process(SubprocessASGIServer().server_process.pid)\n"
            "print(log, [f.path for f in server.open_files() if f.fd in (1, 2)],\n"
            "      [f.path for f in psutil.Process().open_files() if f.fd in (1, 2)], sep='|', flush=True)\n")
    env = {**_env(), "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}  # set before the code imports prefect
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log, server_fds, own_fds = proc.stdout.strip().splitlines()[-1].split("|")
    assert log == str(tmp_path / "prefect/temporary-server.log")
    assert server_fds == str([log, log])  # the server's stdout and stderr are the log file
    assert own_fds == "[]"  # ours are still the pipes pytest reads
    assert "Starting temporary server" in Path(log).read_text()  # Prefect's own line went there too


# -- 7 / 8: signals and live progress --------------------------------------------------------------------------
def test_output_pieces_split_lines_and_progress_updates():
    from flows.pipeline import output_pieces

    stream = io.BufferedReader(io.BytesIO(b"start\r\nbar  10%\rbar  50%\rbar 100%\ndone\nerror: x"))
    assert list(output_pieces(stream)) == [
        ("start", False), ("bar  10%", True), ("bar  50%", True), ("bar 100%", False), ("done", False), ("error: x", False)]


def test_sigterm_stops_the_stage_and_the_temporary_server(tmp_path):
    root = _tiny(tmp_path, **{"train.epochs": 400})  # a train stage long enough to be caught running
    env = {**_env(), "PREFECT_HOME": str(root / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "LOWGRAD_PROGRESS_SECONDS": "1"}
    env.pop("PREFECT_API_URL", None)
    flow = subprocess.Popen([sys.executable, "-m", "flows.pipeline"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in flow.stdout:  # live: the train stage's progress arrives while it runs
            seen.append(line)
            if "[train" in line and "train:" in line:
                break
        assert any("[train" in ln for ln in seen), "".join(seen)
        tree = psutil.Process(flow.pid).children(recursive=True)
        assert tree  # the temporary Prefect server and the running stage
        flow.send_signal(signal.SIGTERM)
        rest = flow.stdout.read()
        assert flow.wait(120) == 130, rest
    finally:
        if flow.poll() is None:
            flow.kill()
    assert "error: interrupted" in rest
    assert "Starting temporary server" not in "".join(seen) + rest  # the flow's own server started quietly
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    assert not (root / "models/trained.pt").exists()
    assert (root / ".dvc/tmp/lowgrad-run.lock").read_text() == ""  # the run lock was released
    status = dvc(root, "status")  # DVC is usable and still sees the train stage as to be run
    assert "train:" in status.stdout
