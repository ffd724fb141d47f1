"""What a run's numbers were computed from: each input's content hash as DVC recorded it in ``dvc.lock`` (never
recomputed: the basis V alone is ~9 GB at the paper's size), the lowgrad version and the git commit.

``score`` writes this into ``report/metrics.json`` and ``report`` shows it at the top of the report, so two reports
can be compared at a glance. A stage run outside DVC (``bench.routes``) has no lock entries: its hashes are null.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from lowgrad import __version__
from lowgrad.config import Params
from lowgrad.paths import COMPONENTS, DVC_LOCK, EXTRACTED, MODEL, SUBSPACE


def _lock_hashes(lock: dict[str, Any], stage: str, kind: str) -> dict[str, str]:
    """``path -> md5`` of a stage's deps or outs in ``dvc.lock`` (directories end in ``.dir``)."""
    return {entry["path"]: entry.get("md5") for entry in lock.get(stage, {}).get(kind, [])}


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def run_provenance(params: Params, root: str | Path = ".") -> dict[str, Any]:
    """The inputs (every set's ``path``, the checkpoint) and the main artifacts (model, V, the gradient stores)
    with the md5 DVC recorded, the lowgrad version and the commit (``dirty``: uncommitted changes)."""
    root = Path(root)
    lock_file = root / DVC_LOCK
    lock = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {}) if lock_file.is_file() else {}
    inputs = {}
    for name, spec in params.data.datasets.items():
        inputs[f"data.datasets.{name}.path"] = {"path": spec.path,
                                                "md5": _lock_hashes(lock, f"prepare@{name}", "deps").get(spec.path)}
    checkpoint = params.model.checkpoint
    inputs["model.checkpoint"] = {"path": checkpoint, "md5": _lock_hashes(lock, "model", "deps").get(checkpoint)}
    artifacts = {MODEL: _lock_hashes(lock, "model", "outs").get(MODEL),
                 SUBSPACE: _lock_hashes(lock, "subspace", "outs").get(SUBSPACE),
                 COMPONENTS: _lock_hashes(lock, "subspace", "outs").get(COMPONENTS)}
    for name in params.data.datasets:
        path = EXTRACTED.format(name=name)
        artifacts[path] = _lock_hashes(lock, f"extract@{name}", "outs").get(path)
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no") if commit else None
    return {"lowgrad": __version__, "git_commit": commit, "git_dirty": bool(status) if commit else None,
            "hashes_from": DVC_LOCK if lock else "no dvc.lock (stages run outside DVC)",
            "inputs": inputs, "artifacts": artifacts}
