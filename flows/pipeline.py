"""Prefect 3 flow over the DVC stage graph: each DVC stage is one task, DVC owns the caching.

Runs with no Prefect server (a temporary local API is started for the run)::

    python -m flows.pipeline                                  # params.yaml as it is
    python -m flows.pipeline --params-file my.yaml --set subspace.k=50

``params_file`` and ``overrides`` are validated, then written into ``params.yaml`` (what ``dvc exp run -S``
does to the workspace; comments are kept), and the stages run in topological order with
``dvc repro --single-item``: unchanged stages are skipped by DVC.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# the temporary API server may take longer than Prefect's default 20 s to start on a busy 2-core machine
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import yaml  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402

from lowgrad.config import parse_params, read_raw, set_dotted  # noqa: E402
from lowgrad.errors import LowgradError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero. ``transient`` is False for user errors (bad params, bad data)."""

    def __init__(self, stage: str, message: str, transient: bool) -> None:
        super().__init__(f"stage '{stage}' failed: {message}")
        self.stage, self.message, self.transient = stage, message, transient


def stage_environment() -> dict[str, str]:
    """``cmd: python ...`` in dvc.yaml must find this interpreter (the one with lowgrad installed)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def stage_order(root: Path = ROOT) -> list[str]:
    """The pipeline's stage names (``prepare@id_train`` ...) in an order that respects every dependency."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        ordered = reversed(list(nx.topological_sort(graph)))
        return [stage.name for stage in ordered if getattr(stage, "cmd", None)]


def apply_params(params_file: str, overrides: dict[str, Any] | None, root: Path = ROOT) -> None:
    """Validate ``params_file`` + ``overrides`` and make them the workspace's ``params.yaml``."""
    from ruamel.yaml import YAML

    source, target = Path(params_file), root / "params.yaml"
    if not source.is_absolute():
        source = root / source
    raw = read_raw(source)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    parse_params(raw, str(source))  # raises ConfigError with one clear line
    if source.resolve() == target.resolve() and not overrides:
        return
    rt = YAML()
    doc = rt.load(source.read_text())
    for key, value in (overrides or {}).items():
        node = doc
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    with open(target, "w") as fh:
        rt.dump(doc, fh)


def _is_transient(task_obj, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as err:
        return err.transient
    except Exception:
        return True
    return False


@task(name="dvc-stage", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_is_transient, task_run_name="{stage}")
def run_stage(stage: str, root: str = str(ROOT)) -> dict[str, Any]:
    """``dvc repro --single-item <stage>``; its output goes to the Prefect log."""
    logger = get_run_logger()
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "--single-item", stage],
        cwd=root, env=stage_environment(), capture_output=True, text=True,
    )
    output = (proc.stdout + proc.stderr).strip()
    for line in output.splitlines()[-40:]:
        logger.info(line)
    if proc.returncode != 0:
        user_errors = [ln for ln in output.splitlines() if ln.startswith("error: ")]
        message = user_errors[-1] if user_errors else (output.splitlines() or ["(no output)"])[-1]
        raise StageFailed(stage, message, transient=not user_errors)
    skipped = "didn't change, skipping" in output
    return {"stage": stage, "status": "skipped" if skipped else "ran", "seconds": round(time.perf_counter() - start, 1)}


@task(name="dvc-push", retries=3, retry_delay_seconds=[10, 30, 90])
def push_artifacts(root: str = str(ROOT)) -> None:
    """``dvc push --run-cache``: outputs and the run cache to the default remote, so a teammate's
    ``dvc pull`` / ``dvc repro --pull`` reuses every stage result instead of recomputing it."""
    logger = get_run_logger()
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "push", "--run-cache"], cwd=root, env=stage_environment(), capture_output=True, text=True
    )
    for line in (proc.stdout + proc.stderr).strip().splitlines()[-10:]:
        logger.info(line)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc push failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")


@flow(name="lowgrad-pipeline", log_prints=True)
def pipeline(
    params_file: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    root: str | None = None,
    push: bool = False,
) -> list[dict[str, Any]]:
    """Run every DVC stage of lowgrad in dependency order; returns one summary row per stage.

    ``root`` is the project directory (default: this checkout); ``push`` pushes outputs and the run cache
    to the DVC remote at the end."""
    logger = get_run_logger()
    project = Path(root) if root else ROOT
    apply_params(params_file, overrides, project)
    summary = []
    for stage in stage_order(project):
        try:
            summary.append(run_stage(stage, str(project)))
        except StageFailed as err:
            logger.error("%s (finished before it: %s)", err, ", ".join(r["stage"] for r in summary) or "none")
            raise
    if push:
        push_artifacts(str(project))
    ran = [r["stage"] for r in summary if r["status"] == "ran"]
    logger.info("pipeline done: %d stages ran (%s), %d skipped", len(ran), ", ".join(ran) or "none", len(summary) - len(ran))
    return summary


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got '{pair}'")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the lowgrad pipeline as a Prefect flow.")
    parser.add_argument("--params-file", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. subspace.k=50")
    parser.add_argument("--push", action="store_true", help="dvc push --run-cache to the default remote at the end")
    args = parser.parse_args()
    os.chdir(ROOT)
    try:
        pipeline(params_file=args.params_file, overrides=_parse_overrides(args.set) or None, push=args.push)
    except (LowgradError, StageFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
