from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOWGRAD_SHARED", ROOT.parent / "shared"))
DIGITS = str(ROOT / "data/embedded/digits.npz")  # the embedded default's inputs, as absolute paths
PHOTOS = str(ROOT / "data/embedded/photos")


def _share_the_cores() -> None:
    """Under pytest-xdist each worker, and every stage process it starts, gets its share of the cores: torch's
    default of one thread per core in every worker oversubscribes them (measured: a 18 s test took 81 s)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(var, threads)


_share_the_cores()  # before torch is imported (the environment is also what stage subprocesses inherit)


def shared_file(relative: str) -> Path:
    """Path into ../shared, or skip the test with the reason."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"needs {path} (../shared with real data and checkpoints is absent)")
    return path


@pytest.fixture(autouse=True)
def _prefect_isolated(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp() / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(home / "results"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(autouse=True)
def _log_handlers_on_open_streams():
    """A logging handler made while a test captured stderr (``capsys``: Prefect configures its handlers, the root
    logger's included, on first use) keeps that test's stream, which pytest closes after it: a later record fails on
    it, and a flow printing to its log turns the failure into a recursion. Before each test such a handler is pointed
    at the current stderr (its stream attribute set: ``setStream`` would flush the closed one)."""
    for logger in [logging.getLogger(), *(obj for obj in logging.Logger.manager.loggerDict.values()
                                          if isinstance(obj, logging.Logger))]:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if stream is not None and getattr(stream, "closed", False):
                handler.stream = sys.stderr
                if hasattr(handler, "console"):  # Prefect's console handler writes through a rich Console
                    handler.console.file = sys.stderr
    yield


@pytest.fixture(autouse=True)
def _user_code_isolated():
    """Each test builds the ``module:architectures.*`` models of its own project: a build leaves that project's root
    on ``sys.path`` and its ``architectures`` modules in ``sys.modules`` (right for a process that builds one
    project), so a worker running many projects' tests drops them after each test."""
    path = list(sys.path)
    yield
    sys.path[:] = path
    for name in [n for n in sys.modules if n == "architectures" or n.startswith("architectures.")]:
        del sys.modules[name]


@pytest.fixture(scope="session")
def tiny_finished(tmp_path_factory) -> Path:
    """The tiny project (``tests.test_pipeline.TINY``) run to the end once per session, shared by the pytest-xdist
    workers (the first to need it builds it under a file lock). Tests take a copy (:func:`tiny_project`)."""
    from filelock import FileLock

    from tests.test_pipeline import TINY, dvc, make_project

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the directory all workers' temporary roots sit in
    root, done = shared / "tiny-finished", shared / "tiny-finished.done"
    with FileLock(str(shared / "tiny-finished.lock")):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # a half-built one from an interrupted build
            root.mkdir()
            dvc(make_project(root, TINY), "repro")
            done.touch()
    return root


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> Iterator[str]:
    """One Prefect API server (``prefect server start`` on 127.0.0.1) for the tests that run flows, started once
    per session and worker; pass it as ``PREFECT_API_URL``. A flow without it starts its own temporary server
    (~20 s each); the tests of that temporary server itself do not use this one."""
    from tests.test_pipeline import _api, _free_port, _wait, terminate

    home = tmp_path_factory.mktemp("prefect-server")
    api = f"http://127.0.0.1:{_free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": api}
    log = open(home / "server.log", "w")
    port = api.rsplit(":", 1)[1].split("/")[0]
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: server.poll() is None and _api(f"{api}/health"), 120, f"the Prefect server (log: {home / 'server.log'})")
        yield api
    finally:
        terminate(server)
        log.close()


@pytest.fixture
def tiny_project(tiny_finished, tmp_path) -> Path:
    """A copy of the finished tiny project (outputs, dvc.lock and DVC cache) for one test to change."""
    return Path(shutil.copytree(tiny_finished, tmp_path / "tiny", symlinks=True))


@pytest.fixture
def two_threads():
    """Two torch threads for one test, so the exact-NFK hash splits its rows over two pool threads (the test runner
    sets one thread per worker); the count is restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items) -> None:
    """Longest first: files holding ``slow`` tests go to the workers before the others, which then fill the gaps (a
    slow file handed out last would run alone at the end). Files move as a whole; the order within one is kept."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: file order otherwise kept
