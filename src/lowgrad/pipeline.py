"""The stage plan: every DVC stage's body in dependency order, for callers that run all stages in one process
(``bench.routes``, tests). ``dvc repro`` runs the same bodies one per process, through ``stages/<name>.py``;
the bodies live one per module in :mod:`lowgrad.stages`, the artifact layout in :mod:`lowgrad.paths`."""

from __future__ import annotations

from collections.abc import Callable

from lowgrad.config import Params
from lowgrad.stages import stage_names
from lowgrad.stages.extract import extract
from lowgrad.stages.factors import fit_factors
from lowgrad.stages.model import build_classifier
from lowgrad.stages.prepare import prepare
from lowgrad.stages.project import project
from lowgrad.stages.report import report
from lowgrad.stages.score import score
from lowgrad.stages.subspace import fit_subspace

BODIES: dict[str, Callable[..., None]] = {
    "prepare": prepare, "model": build_classifier, "factors": fit_factors, "extract": extract,
    "subspace": fit_subspace, "project": project, "score": score, "report": report,
}


def stage_plan(params: Params) -> list[tuple[str, Callable[..., None], tuple[str, ...]]]:
    """``(DVC stage name, body, extra args)`` for every stage of this configuration, in dependency order."""
    plan = []
    for name in stage_names(params):
        stage, _, dataset = name.partition("@")
        plan.append((name, BODIES[stage], (dataset,) if dataset else ()))
    return plan
