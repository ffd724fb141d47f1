"""The stage plan: every DVC stage's body in dependency order, for callers that run all stages in one process
(``bench.routes``, tests). ``dvc repro`` runs the same bodies one per process, through ``stages/<name>.py``;
the bodies live one per module in :mod:`lowgrad.stages`, the artifact layout in :mod:`lowgrad.paths`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lowgrad.config import Params
from lowgrad.plan import stage_plan
from lowgrad.stages.extract import extract
from lowgrad.stages.factors import factors
from lowgrad.stages.model import model
from lowgrad.stages.prepare import prepare
from lowgrad.stages.project import project
from lowgrad.stages.report import report
from lowgrad.stages.score import score
from lowgrad.stages.subspace import subspace
from lowgrad.stages.train import train

# each body is named after its DVC stage: dvc.yaml `model` -> stages/model.py -> lowgrad.stages.model.model
BODIES: dict[str, Callable[..., None]] = {
    "prepare": prepare, "train": train, "model": model, "factors": factors, "extract": extract,
    "subspace": subspace, "project": project, "score": score, "report": report,
}


def stage_bodies(params: Params, root: str | Path = ".") -> list[tuple[str, Callable[..., None], tuple[str, ...]]]:
    """``(DVC stage name, body, extra args)`` for every stage of this configuration, in ``root/dvc.yaml``'s order
    (:func:`lowgrad.plan.stage_plan`)."""
    plan = []
    for name in stage_plan(params, root):
        stage, _, dataset = name.partition("@")
        plan.append((name, BODIES[stage], (dataset,) if dataset else ()))
    return plan
