"""DVC versions every input: a data set replaced in place reruns exactly what it feeds, a damaged gradient chunk is
recomputed (or stops the next reader with one line naming it), and a flow never starts beside a running DVC command.
Checkpoints and teammates: ``tests/test_teammates.py``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowgrad.store import ChunkedStore
from tests.test_pipeline import _env, dvc, ran_stages, set_param, status_stages

pytestmark = pytest.mark.slow


def _write_npz(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    np.savez(path, images=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), labels=-np.ones(n, np.int64))


def _add_png(folder: Path, name: str, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / name)


def _metrics(root: Path) -> dict:
    """The metrics without what differs between two runs of the same inputs (timings, provenance)."""
    m = json.loads((root / "report/metrics.json").read_text())
    m.pop("timings"), m.pop("provenance"), m["bootstrap"].pop("wall_s")
    return m


@pytest.fixture(scope="module")
def finished(tiny_finished, tmp_path_factory) -> Path:
    """The finished tiny project with an npz and an image-folder OOD set added, run to the end (only the new sets'
    stages and score / report run: the subspace is fitted on id_train alone)."""
    root = Path(shutil.copytree(tiny_finished, tmp_path_factory.mktemp("versioned") / "p", symlinks=True))
    _write_npz(root / "ood.npz", 80, seed=1)
    for i in range(12):
        _add_png(root / "imgs" / ("a" if i % 2 else "b"), f"{i}.png", seed=i)
    set_param(root, "data.datasets.extra", {"source": "npz", "path": "ood.npz"})
    set_param(root, "data.datasets.folder", {"source": "image_folder", "path": "imgs", "resize": True})
    ran = ran_stages(dvc(root, "repro"))
    assert ran == {f"{s}@{d}" for s in ("prepare", "extract", "project") for d in ("extra", "folder")} | {"score", "report"}
    return root


@pytest.fixture
def project(finished, tmp_path) -> Path:
    """A copy of the finished project (DVC cache and all) for one test to change."""
    return Path(shutil.copytree(finished, tmp_path / "p", symlinks=True))


def test_an_npz_set_replaced_in_place_reruns_its_stages(project):
    _write_npz(project / "ood.npz", 120, seed=2)
    assert status_stages(project) == {"prepare@extra"}
    assert ran_stages(dvc(project, "repro")) == {"prepare@extra", "extract@extra", "project@extra", "score", "report"}
    assert _metrics(project)["samples"]["extra"] == 120
    assert ran_stages(dvc(project, "repro")) == set()


def test_an_image_added_to_a_folder_set_reruns_its_stages(project):
    _add_png(project / "imgs/a", "new.png", seed=99)
    assert status_stages(project) == {"prepare@folder"}
    assert ran_stages(dvc(project, "repro")) == {"prepare@folder", "extract@folder", "project@folder", "score", "report"}
    assert _metrics(project)["samples"]["folder"] == 13


def _flip_byte(file: Path, keep_mtime: bool) -> None:
    stat = file.stat()
    data = bytearray(file.read_bytes())
    data[100] ^= 0x10  # inside the first row (a last chunk is padded to full size: its tail holds no values)
    file.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_damaged_gradient_chunk_is_recomputed_by_the_next_repro(project, damage):
    store = project / "artifacts/extract/id_train.zarr"
    intact = ChunkedStore.open(store).read("grads")
    metrics = _metrics(project)
    chunk = store / "grads/c/1/0"
    _flip_byte(chunk, keep_mtime=False) if damage == "flip" else chunk.unlink()
    assert "extract@id_train" in status_stages(project)
    proc = dvc(project, "repro")
    assert "chunks [1] are damaged or missing" in proc.stdout + proc.stderr
    assert "extract@id_train" in ran_stages(proc)
    np.testing.assert_array_equal(ChunkedStore.open(store).read("grads"), intact)
    assert _metrics(project) == metrics
    assert ran_stages(dvc(project, "repro")) == set()


def test_a_flip_dvc_cannot_see_stops_the_next_reader_with_one_line(project):
    store = project / "artifacts/extract/id_train.zarr"
    intact = ChunkedStore.open(store).read("grads")
    assert status_stages(project) == set()  # (DVC records this copy's file times and inodes)
    _flip_byte(store / "grads/c/2/0", keep_mtime=True)
    assert status_stages(project) == set()  # DVC's own check keys on file times: it sees nothing
    set_param(project, "subspace.k", 6)  # the next stage that reads the store
    proc = dvc(project, "repro", check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr
    assert "chunk 2 (rows 128-149) of 'grads' file grads/c/2/0 does not match its checksum" in errors[0]
    assert "dvc repro -f -s extract@id_train" in errors[0]
    repaired = dvc(project, "repro", "-f", "-s", "extract@id_train")  # the repair the line names: that chunk only
    assert "chunks [2] are damaged or missing" in repaired.stdout + repaired.stderr
    np.testing.assert_array_equal(ChunkedStore.open(store).read("grads"), intact)
    dvc(project, "repro")
    assert _metrics(project)["samples"]["id_train"] == 150


def test_repro_force_recomputes_an_intact_store_from_scratch(project):
    chunks = sorted((project / "artifacts/extract/id_test.zarr").glob("*/c/*/0"))
    before = {f: f.stat().st_mtime_ns for f in chunks}
    proc = dvc(project, "repro", "-f", "--single-item", "extract@id_test")
    assert "finished and intact: recomputing it from scratch" in proc.stdout + proc.stderr
    assert all(f.stat().st_mtime_ns != t for f, t in before.items()), "every chunk was written again"


def _dvc_writes(root: Path) -> bool:
    """DVC's rwlock names a path a running stage writes."""
    try:
        return bool(json.loads((root / ".dvc/tmp/rwlock").read_text()).get("write"))
    except (OSError, ValueError):
        return False


def test_the_flow_refuses_to_start_beside_a_running_dvc_command(project):
    set_param(project, "train.epochs", 400)  # a dvc repro long enough to be caught running
    env = {**_env(), "PREFECT_HOME": str(project / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    repro = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not _dvc_writes(project):
            time.sleep(0.2)
        params = (project / "params.yaml").read_text()
        flow = subprocess.run([sys.executable, "-m", "flows.pipeline", "--set", "subspace.k=4"], cwd=project, env=env,
                              capture_output=True, text=True, timeout=300)
        assert repro.poll() is None, "the dvc repro must still be running"
    finally:
        os.killpg(repro.pid, signal.SIGINT)
        try:
            repro.wait(60)
        except subprocess.TimeoutExpired:  # a loaded machine: how fast dvc winds down is not what this tests
            os.killpg(repro.pid, signal.SIGKILL)
            repro.wait(60)
    errors = [ln for ln in flow.stderr.splitlines() if ln.startswith("error: ")]
    assert flow.returncode == 1 and len(errors) == 1, flow.stderr[-2000:]
    assert f"a DVC command is running in this checkout (PID {repro.pid}: " in errors[0] and "repro" in errors[0]
    assert (project / "params.yaml").read_text() == params, "nothing changed"
    assert not (project / ".prefect/temporary-server.log").exists()  # refused before a Prefect server was started
