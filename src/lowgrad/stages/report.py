"""Stage ``report``: ``report/report.md`` and its plots from the metrics, the scores and the subspace spectrum."""

from __future__ import annotations

import json
import ast
import importlib.util
import platform
from pathlib import Path

import numpy as np

from lowgrad import __version__
from lowgrad.config import Params
from lowgrad.paths import EXTRACTED, METRICS, MODEL_INFO, PLOTS, REPORT, SCORES, SUBSPACE
from lowgrad.report import write_report
from lowgrad.store import ChunkedStore
from lowgrad.subspace import GradientSubspace


def torch_version() -> str:
    """torch's full version with its build tag (``2.14.1+cu130``), read from ``torch/version.py`` without importing
    torch (2-3 s that the report does not otherwise need)."""
    spec = importlib.util.find_spec("torch")
    tree = ast.parse(Path(spec.origin).with_name("version.py").read_text())
    for node in tree.body:
        target = getattr(node, "target", None) or (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "__version__":
            return ast.literal_eval(node.value)
    raise RuntimeError("torch/version.py has no __version__")


def report(params: Params) -> None:
    metrics = json.loads(Path(METRICS).read_text())
    with np.load(SCORES) as z:
        scores = {k: z[k] for k in z.files}
    sub = GradientSubspace.load(SUBSPACE, lazy=True)
    sizes = {name: ChunkedStore.open(EXTRACTED.format(name=name)).n_rows for name in params.data.datasets}
    n_params = ChunkedStore.open(EXTRACTED.format(name="id_train")).meta["n_params"]
    run = {
        "lowgrad": __version__,
        "torch": torch_version(),
        "python": platform.python_version(),
        "model": json.loads(Path(MODEL_INFO).read_text()),
        "gradient parameters (P)": n_params,
        "samples per set": sizes,
    }
    write_report(params, metrics, scores, sub.explained_variance_ratio_, run, REPORT, PLOTS)
