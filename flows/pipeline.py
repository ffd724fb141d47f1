"""Prefect 3 flow over the DVC stage graph: each DVC stage is one task, DVC owns the caching.

Runs with no Prefect server (a temporary local API is started for the run; its own output goes to
``$PREFECT_HOME/temporary-server.log``)::

    python -m flows.pipeline                                  # params.yaml as it is
    python -m flows.pipeline --params-file my.yaml --set subspace.k=50

``params_file`` and ``overrides`` are validated, then written into ``params.yaml`` (what ``dvc exp run -S``
does to the workspace; comments are kept), and the stages run in dvc.yaml's (dependency) order with
``dvc repro --single-item``: unchanged stages are skipped by DVC.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# the temporary API server may take longer than Prefect's default 20 s to start on a busy 2-core machine
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.exceptions import FailedRun  # noqa: E402
from prefect.states import Failed  # noqa: E402

from lowgrad.config import (  # noqa: E402
    drop_dotted, get_dotted, load_params, parse_params, parse_yaml, read_raw, set_dotted,
)
from lowgrad.errors import ConfigError, LowgradError, exit_on_user_error, fail  # noqa: E402
from lowgrad.paths import DVC_YAML, METRICS, PARAMS  # noqa: E402
from flows.params_file import composed_document, parse_overrides, round_trip_yaml  # noqa: E402
from flows.server import start_temporary_server  # noqa: E402
from lowgrad.runlock import RunLock  # noqa: E402
from lowgrad.plan import stage_plan  # noqa: E402
from lowgrad.stages.prepare import prepared_size  # noqa: E402
from lowgrad.scoring import check_bank_size  # noqa: E402

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


def dvc_param_keys(root: Path = ROOT) -> list[str]:
    """The plain params keys that ``dvc.yaml`` declares or interpolates (``${model.checkpoint}``; ``foreach``
    templates left out)."""
    stages = parse_yaml((root / DVC_YAML).read_text(), DVC_YAML)["stages"]
    keys = set()
    for stage in stages.values():
        body = stage.get("do", stage)
        keys |= {p for p in body.get("params", []) if isinstance(p, str) and "${" not in p}
        keys |= {m for d in body.get("deps", []) for m in re.findall(r"\$\{([^}]+)\}", str(d))
                 if m != "key" and not m.startswith("item.")}
    return sorted(keys)


def missing_inputs(params, root: Path) -> list[tuple[str, str]]:
    """``(params key, path)`` of every input DVC will hash that does not exist (paths relative to ``root``)."""
    missing = [(f"data.datasets.{name}.path", spec.path) for name, spec in params.data.datasets.items()
               if not (root / spec.path).exists()]
    if not params.model.trains and not (root / params.model.checkpoint).exists():
        missing.append(("model.checkpoint", params.model.checkpoint))
    return missing


def check_architecture(params) -> None:
    """``model.arch`` builds as the train and model stages will build it (its name known, its head found), and on
    the exact route its selected parameters fit ``gradient.max_params`` as ``extract`` requires; or one error line
    naming the problem (with the closest known names), before a stage trains or extracts anything."""
    from lowgrad.gradients import select_parameters
    from lowgrad.models import build_model
    from lowgrad.route import Route

    model = build_model(params.model.arch, params.model.num_classes, params.data.channels, params.data.image_size)
    named = dict(model.named_parameters())
    Route.from_params(params).check_model(sum(named[n].numel() for n in select_parameters(model, params.gradient.params)),
                                          params)


def check_inputs(params, root: Path) -> None:
    """The architecture builds and every input DVC will hash exists: one ``error:`` line naming the problem before
    any stage runs (DVC's own message for a missing dependency is several lines and names no params key)."""
    check_architecture(params)
    missing = missing_inputs(params, root)
    if missing:
        key, path = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        what = "checkpoint" if key == "model.checkpoint" else f"dataset '{key.split('.')[2]}': input"
        raise ConfigError(f"{what} not found: {path} ({key}){more}; paths are relative to {root} or absolute")


def validated_params(
    params_file: str, overrides: dict[str, Any] | None, root: Path = ROOT, drop: list[str] | None = None
) -> tuple[Path, dict[str, Any], Any]:
    """``(source path, raw mapping, validated Params)`` of ``params_file`` + ``overrides`` minus the ``drop`` keys;
    raises :class:`ConfigError` with one clear line. Touches nothing."""
    source = Path(params_file)
    if not source.is_absolute():
        source = root / source
    raw = read_raw(source)
    for key in drop or []:
        drop_dotted(raw, key)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return source, raw, parse_params(raw, str(source))


def check(params_file: str, overrides: dict[str, Any] | None, root: Path = ROOT) -> list[str]:
    """What ``--check`` prints: the params validated as a run would (inputs included), the route and the stage
    plan. Runs nothing and changes nothing (no Prefect server, no lock, ``params.yaml`` untouched)."""
    from lowgrad.route import Route

    _, _, params = validated_params(params_file, overrides, root)
    check_inputs(params, root)
    plan = stage_plan(params, root)
    given = params_file + "".join(f" --set {key}={value}" for key, value in (overrides or {}).items())
    return [f"params ok: {given} (route: {Route.from_params(params).name})",
            f"stage plan: {len(plan)} stages, in this order (dvc repro --single-item each; unchanged ones are skipped)",
            *(f"  {stage}" for stage in plan)]


def preflight(params_file: str, overrides: dict[str, Any] | None, root: Path = ROOT, wait: bool = False) -> None:
    """The refusals a run meets first, checked before a temporary Prefect server is started (~20 s) for nothing:
    the params (file, ``--set``'s and inputs) and, unless ``wait``, another run or a DVC command in the checkout.
    Changes nothing; the flow checks all of it again under its own lock (the checkout may change in between)."""
    _, _, params = validated_params(params_file, overrides, root)
    check_inputs(params, root)
    if not wait:
        with RunLock(root):
            pass


def apply_params(
    params_file: str, overrides: dict[str, Any] | None, root: Path = ROOT, drop: list[str] | None = None
) -> None:
    """Validate ``params_file`` + ``overrides`` (minus the ``drop`` keys) and make them the workspace's
    ``params.yaml``. A key that ``dvc.yaml`` tracks but the file leaves to its default is written out with that
    default (DVC refuses a stage whose declared param is missing)."""
    source, raw, checked = validated_params(params_file, overrides, root, drop)
    target = root / PARAMS
    check_inputs(checked, root)  # before params.yaml is touched
    validated = checked.model_dump()
    defaults = {}
    for key in dvc_param_keys(root):
        found, value = get_dotted(validated, key)
        if found and not get_dotted(raw, key)[0]:
            defaults[key] = value
    changes = {**defaults, **(overrides or {})}
    if source.resolve() == target.resolve() and not changes and not drop:
        return
    rt = round_trip_yaml()
    doc = composed_document(source, rt)
    for key in drop or []:
        drop_dotted(doc, key)
    for key, value in changes.items():
        node = doc
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    with open(target, "w") as fh:
        rt.dump(doc, fh)


# a stage failure is retried only when its output names a cause that can clear by itself
TRANSIENT_MARKERS = ("Unable to acquire lock", "Connection reset", "Connection refused", "timed out", "Temporary failure")
PROGRESS_EVERY_S = float(os.environ.get("LOWGRAD_PROGRESS_SECONDS", "10"))  # tqdm updates: one log line per period
_running: list[subprocess.Popen] = []  # the stage process(es) now running, for the signal handler


def _is_transient(task_obj, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as err:
        return err.transient
    except FailedRun:  # a Failed state the task returned: a user error, which no retry can fix
        return False
    except Exception:
        return True  # the task itself broke (e.g. the subprocess could not start): worth another try
    return False


def output_pieces(stream) -> Iterator[tuple[str, bool]]:
    """``(text, is_progress)`` for each line of a byte stream as it arrives; a piece ended by a bare ``\r`` is a
    progress-bar update (tqdm redraws its line that way)."""
    buf = b""
    while chunk := stream.read1(65536):
        buf += chunk
        while (m := re.search(rb"\r\n|\r|\n", buf)) and (m.group() != b"\r" or m.end() < len(buf)):
            piece, sep, buf = buf[: m.start()], m.group(), buf[m.end():]
            text = piece.decode(errors="replace").rstrip()
            if text:
                yield text, sep == b"\r"
    if buf.strip():
        yield buf.decode(errors="replace").rstrip(), False


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop a stage's whole process group (dvc and the stage under it): SIGINT first, so DVC releases its
    locks and records nothing half-done, then SIGTERM, then SIGKILL."""
    for sig, grace in ((signal.SIGINT, 15), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)


@task(name="dvc-stage", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_is_transient, task_run_name="{stage}")
def run_stage(stage: str, root: str = str(ROOT)):
    """``dvc repro --single-item <stage>``, its output streamed line by line to the log (``[stage  12s] ...``;
    progress bars every ``LOWGRAD_PROGRESS_SECONDS``). A user error (an ``error:`` line) fails the task with
    that line and is never retried."""
    logger = get_run_logger()
    start = time.perf_counter()
    last_progress = -float("inf")
    tail: deque[str] = deque(maxlen=50)
    errors: list[str] = []
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=root, env=stage_environment(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,  # its own group: stopped as one
    )
    _running.append(proc)
    try:
        for text, progress in output_pieces(proc.stdout):
            elapsed = time.perf_counter() - start
            if progress and elapsed - last_progress < PROGRESS_EVERY_S:
                continue
            last_progress = elapsed if progress else last_progress
            logger.info("[%s %4.0fs] %s", stage, elapsed, text)
            tail.append(text)
            if text.startswith("error: "):
                errors.append(text.removeprefix("error: "))
        returncode = proc.wait()
    finally:
        stop_process_group(proc)
        _running.remove(proc)
    if returncode != 0:
        if errors:
            return Failed(message=f"stage '{stage}' failed: {errors[-1]}")
        last = tail[-1] if tail else "(no output)"
        raise StageFailed(stage, last, transient=any(m in line for line in tail for m in TRANSIENT_MARKERS))
    skipped = any("didn't change, skipping" in line for line in tail)
    return {"stage": stage, "status": "skipped" if skipped else "ran", "seconds": round(time.perf_counter() - start, 1)}


def _failure_message(state) -> str:
    """The one line a failed task or flow state stands for (a raised exception's text, or the state message)."""
    try:
        state.result()
    except Exception as err:  # noqa: BLE001 - any failure is reported by its message
        return str(err)
    return state.message or "failed"


def publish_report(root: Path) -> None:
    """The results as Prefect artifacts, built from ``report/metrics.json`` (so scheduled runs can be read in the
    Prefect UI): the verdict as Markdown and as a table, and the mean metrics with their intervals."""
    from lowgrad.report import results_table, verdict_rows, verdict_section

    metrics = json.loads((root / METRICS).read_text())
    columns = list(next(iter(metrics["methods"].values())))  # the OOD sets, then the mean
    markdown = [*verdict_section(metrics, plot=False), "## Results", "", results_table(metrics, columns), ""]
    create_markdown_artifact(key="lowgrad-report", markdown="\n".join(markdown),
                             description="lowgrad: does the gradient help? (full report: report/report.md)")
    create_table_artifact(key="lowgrad-verdict", table=verdict_rows(metrics),
                          description="paired differences, gradient row - baseline, with bootstrap intervals")
    rows = []
    for row, table in metrics["methods"].items():
        mean = table["mean"]
        rows.append({"row": row, **{m: round(mean[m], 2) for m in ("fpr95", "auroc", "aupr_in", "aupr_out")},
                     **{f"{m}_ci": "[{:.2f}, {:.2f}]".format(*mean["ci"][m]) for m in ("fpr95", "auroc") if "ci" in mean}})
    create_table_artifact(key="lowgrad-mean-metrics", table=rows, description="mean over OOD sets, with 95 % intervals")


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
    params_file: str = PARAMS,
    overrides: dict[str, Any] | None = None,
    root: str | None = None,
    push: bool = False,
    wait_for_lock: bool = False,
):
    """Run every DVC stage of lowgrad in dependency order; returns one summary row per stage.

    ``root`` is the project directory (default: this checkout); ``push`` pushes outputs and the run cache
    to the DVC remote at the end. One run per checkout: a second refuses at once (``wait_for_lock``: waits)."""
    logger = get_run_logger()
    project = Path(root) if root else ROOT
    summary: list[dict[str, Any]] = []
    try:
        with RunLock(project, wait=wait_for_lock):
            apply_params(params_file, overrides, project)
            params = load_params(project / PARAMS)
            for stage in stage_plan(params, project):
                state = run_stage(stage, str(project), return_state=True)
                if not state.is_completed():
                    message = _failure_message(state)
                    logger.error("%s (finished before it: %s)", message, ", ".join(r["stage"] for r in summary) or "none")
                    return Failed(message=message)
                summary.append(state.result())
                if stage == "prepare@id_train":  # sizes are known now: refuse a too-small bank before extraction
                    check_bank_size(params, prepared_size("id_train", project))
            publish_report(project)
    except LowgradError as err:
        logger.error("error: %s", err)
        return Failed(message=str(err))
    if push:
        push_artifacts(str(project))
    ran = [r["stage"] for r in summary if r["status"] == "ran"]
    logger.info("pipeline done: %d stages ran (%s), %d skipped", len(ran), ", ".join(ran) or "none", len(summary) - len(ran))
    return summary


def _interrupt(signum: int, frame) -> None:
    """SIGINT / SIGTERM: stop the running stage's process group, then unwind (the temporary Prefect server and
    the run lock are released on the way out)."""
    for proc in list(_running):
        stop_process_group(proc)
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flows.pipeline`` (``tests/test_docs_commands.py`` parses documented ones)."""
    parser = argparse.ArgumentParser(description="Run the lowgrad pipeline as a Prefect flow.")
    parser.add_argument("--params-file", default=PARAMS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. subspace.k=50")
    parser.add_argument("--push", action="store_true", help="dvc push --run-cache to the default remote at the end")
    parser.add_argument("--wait", action="store_true", help="wait for a run already going in this checkout")
    parser.add_argument("--check", action="store_true",
                        help="validate the params (file, --set's and inputs) and print the stage plan; run nothing")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    os.chdir(ROOT)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    with exit_on_user_error(interrupted="the running stage was stopped, finished stages and the previous detector, "
                                        "scores and report are kept: rerun to continue"):
        overrides = parse_overrides(args.set) or None
        if args.check:
            print("\n".join(check(args.params_file, overrides)))
            return
        preflight(args.params_file, overrides, wait=args.wait)
        start_temporary_server()
        state = pipeline(params_file=args.params_file, overrides=overrides, push=args.push, wait_for_lock=args.wait,
                         return_state=True)
    if not state.is_completed():
        fail(_failure_message(state))


if __name__ == "__main__":
    main()
