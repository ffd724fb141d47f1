from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOWGRAD_SHARED", ROOT.parent / "shared"))


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
