"""Watch what a deployed model receives: a Prefect flow that scores each new batch in a folder with a finished run's
saved detector (``artifacts/detector``; loaded and checked once per run, never refitted).

A batch is an ``.npz`` (``images`` uint8 N x H x W x C, or the JPEG layout), a folder of images or an ImageFolder
tree (one rule for folders: ``lowgrad.data.folder_images``), directly inside the watched folder. Each result records
what produced it: the batch's sha256, the detector's digest (the sha256 of its ``detector.json``, which names the
sha256 of everything it was fitted with), the rows, the bound and the lowgrad version. A batch counts as scored
before only when its record matches all of them; a batch replaced in place, a new detector (a rerun of ``score``),
other rows, another bound or another lowgrad version score it again, and a batch that failed is retried at every
run. For each batch to score the flow writes ``<results>/<batch>.json`` (per row: the
fraction flagged as OOD at the row's threshold of 95 % ID TPR, a one-sided binomial p-value against the 5 % that ID
data is flagged at, and the batch's score histogram beside the run's id_test one) and ``<results>/<batch>.png``,
publishes them as Prefect artifacts, and fails the run, after writing every result, when a batch's flagged fraction
passes ``bound`` on any watched row, or when a batch cannot be read or scored (its record holds the one-line reason;
the other batches are scored; the run's message counts the failed batches). ``results`` defaults to ``<watch>/.lowgrad-monitor``. ::

    python -m flows.monitor --run . --watch incoming/ --rows grad_residual,knn --bound 0.25 --once  # one pass now
    prefect server start --host 127.0.0.1 &                      # schedules need a server (flows.deploy)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.monitor --run . --watch incoming/ --rows grad_residual,knn --every 300      # serves until stopped
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import numpy as np  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.states import Failed  # noqa: E402

from lowgrad.errors import LowgradError, exit_on_user_error, fail  # noqa: E402

DEPLOYMENT = "lowgrad-monitor"
RESULTS = ".lowgrad-monitor"
HISTOGRAM_BINS = 30


def batches(watch: Path, results: Path) -> list[Path]:
    """The batches in ``watch``: ``.npz`` files and folders, by name (hidden entries and the results folder left
    out)."""
    if not watch.is_dir():
        raise LowgradError(f"watched folder not found: {watch}")
    return sorted(p for p in watch.iterdir() if not p.name.startswith(".") and p.resolve() != results.resolve()
                  and (p.is_dir() or p.suffix == ".npz"))


def check_settings(run: str, rows: list[str] | None, bound: float) -> None:
    """Refuse, in one line, a run without a saved detector, rows it does not have, a bound that is not a fraction:
    before anything is served or scored (the artifact's digests are checked when it is loaded to score)."""
    from lowgrad.saved_detector import read_meta

    if not 0 <= bound <= 1:
        raise LowgradError(f"bound {bound}: a fraction of a batch, between 0 and 1")
    known = read_meta(run)["thresholds"]
    unknown = [r for r in rows or [] if r not in known]
    if unknown or rows == []:
        raise LowgradError(f"unknown row(s) {', '.join(unknown) or '(none given)'}: the run has {', '.join(known)}")


def _key(batch: Path) -> str:
    """A Prefect artifact key for a batch: lowercase letters, digits and dashes."""
    return "lowgrad-monitor-" + (re.sub(r"[^a-z0-9]+", "-", batch.name.lower()).strip("-") or "batch")


def summarise(scores: dict[str, np.ndarray], thresholds: dict[str, float], id_test: dict[str, np.ndarray],
              tpr: float) -> dict[str, dict[str, Any]]:
    """Per row: the fraction flagged, its binomial p-value against ID's ``1 - tpr``, both histograms on shared bins."""
    from scipy.stats import binomtest

    out = {}
    from lowgrad.saved_detector import flagged

    for row, s in scores.items():
        count = int(np.sum(flagged(s, thresholds[row])))
        edges = np.histogram_bin_edges(np.concatenate([s, id_test[row]]), bins=HISTOGRAM_BINS)
        out[row] = {
            "flagged": count,
            "flagged_fraction": count / len(s),
            "p_value_vs_id": float(binomtest(count, len(s), 1.0 - tpr, alternative="greater").pvalue),
            "threshold": thresholds[row],
            "histogram": {"edges": edges.tolist(), "batch": np.histogram(s, edges)[0].tolist(),
                          "id_test": np.histogram(id_test[row], edges)[0].tolist()},
        }
    return out


def plot(path: Path, batch: str, rows: dict[str, dict[str, Any]]) -> None:
    """Each row's batch histogram against id_test (densities) with its threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowgrad.paths import atomic_path

    cols = min(3, len(rows))
    fig, axes = plt.subplots((len(rows) + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.0 * ((len(rows) + cols - 1) // cols)),
                             squeeze=False)
    for ax, (row, r) in zip(axes.flat, rows.items()):
        h = r["histogram"]
        edges = np.asarray(h["edges"])
        for counts, label, colour in ((h["id_test"], "ID test (the run's)", "tab:blue"), (h["batch"], batch, "tab:red")):
            counts = np.asarray(counts, dtype=float)
            ax.stairs(counts / max(counts.sum(), 1.0), edges, fill=True, alpha=0.45, color=colour, label=label)
        ax.axvline(r["threshold"], color="black", linestyle="--", linewidth=1, label="threshold (95 % ID TPR)")
        ax.set_title(f"{row}: {100 * r['flagged_fraction']:.1f} % flagged", fontsize=10)
        ax.set_xlabel("score (higher = more ID)")
        ax.set_ylabel("fraction of images")
    for ax in list(axes.flat)[len(rows):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def setting(run: str | Path, rows: list[str] | None, bound: float) -> dict[str, Any]:
    """What a batch's result belongs to besides the batch: the detector (the sha256 of its ``detector.json``), the
    rows watched (None: every row), the bound and the lowgrad version."""
    from lowgrad import __version__
    from lowgrad.paths import DETECTOR_META, sha256

    return {"detector": sha256(Path(run) / DETECTOR_META), "watched_rows": rows, "bound": bound, "lowgrad": __version__}


def scored_before(record: Path, sha: str, current: dict[str, Any]) -> bool:
    """The batch's recorded result is this batch's, without error, and made by the detector and settings in force."""
    import json

    try:
        old = json.loads(record.read_text())
    except (OSError, ValueError):
        return False  # missing or unreadable: scored again
    return (isinstance(old, dict) and old.get("sha256") == sha and "error" not in old
            and all(old.get(key) == value for key, value in current.items()))


@task(name="score-batch", task_run_name="{batch_name}", cache_policy=NO_CACHE)  # no retries: a bad batch is the user's
def score_batch(detector, batch: Path, batch_name: str, sha: str, results: Path,
                current: dict[str, Any]) -> dict[str, Any]:
    """Score one batch with the watched rows and bound of ``current`` (:func:`setting`), write its JSON and PNG,
    publish its artifacts; returns the JSON's content."""
    from lowgrad.data import read_images
    from lowgrad.paths import write_json
    from lowgrad.saved_detector import TPR

    logger = get_run_logger()
    rows, bound = current["watched_rows"], current["bound"]
    try:
        images, _ = read_images(batch, detector.params.data)
        scores = detector.score(images, rows=rows)
    except Exception as err:  # noqa: BLE001 - any batch that fails is recorded with its reason; the others go on
        reason = str(err) if isinstance(err, LowgradError) else f"{type(err).__name__}: {err}"
        result = {"batch": batch_name, "sha256": sha, **current, "error": reason.replace("\n", " ")}
        write_json(results / f"{batch_name}.json", result)  # retried at the next run (scored_before is False)
        logger.error("error: %s: %s", batch_name, result["error"])
        return result
    per_row = summarise(scores, detector.thresholds, detector.id_test_scores, TPR)  # scores are finite (score checks)
    over = [row for row, r in per_row.items() if r["flagged_fraction"] > bound]
    result = {"batch": batch_name, "sha256": sha, **current, "images": len(images), "over_bound": over,
              "rows": per_row}
    plot(results / f"{batch_name}.png", batch_name, per_row)
    write_json(results / f"{batch_name}.json", result)  # last: a batch counts as scored once its JSON is there
    create_table_artifact(key=_key(batch), description=f"{batch_name}: {len(images)} images, bound {bound:.0%}", table=[
        {"row": row, "flagged %": round(100 * r["flagged_fraction"], 2), "p vs ID 5 %": f"{r['p_value_vs_id']:.2g}",
         "threshold": round(r["threshold"], 6), "over bound": row in over} for row, r in per_row.items()])
    logger.info("%s: %d images; flagged %s%s", batch_name, len(images),
                ", ".join(f"{row} {100 * r['flagged_fraction']:.1f} %" for row, r in per_row.items()),
                f"; OVER THE BOUND {bound:.0%}: {', '.join(over)}" if over else "")
    return result


@flow(name="lowgrad-monitor", log_prints=True)
def monitor(run: str, watch: str, rows: list[str] | None = None, bound: float = 0.25, results: str | None = None,
            device: str = "cpu"):
    """Score each new batch in ``watch`` with the saved detector of the run at ``run``, on ``device``; fails when a
    batch's flagged fraction passes ``bound`` on a row of ``rows`` (default: every row of the run)."""
    from lowgrad.api import OODDetector
    from lowgrad.paths import sha256

    logger = get_run_logger()
    watch_dir = Path(watch)
    out = Path(results) if results else watch_dir / RESULTS
    try:
        check_settings(run, rows, bound)
        current = setting(run, rows, bound)
        todo, scored = [], []
        for batch in batches(watch_dir, out):
            try:
                sha = sha256(batch)
            except OSError as err:
                raise LowgradError(f"cannot read batch {batch}: {err.strerror or err}") from None
            if scored_before(out / f"{batch.name}.json", sha, current):
                scored.append(batch.name)
            else:
                todo.append((batch, sha))
        logger.info("%s: %d batches, %d new (%s), %d scored before", watch_dir, len(todo) + len(scored), len(todo),
                    ", ".join(b.name for b, _ in todo) or "none", len(scored))
        if not todo:
            return {"scored": [], "skipped": scored}
        detector = OODDetector.load(run, device=device)
        out.mkdir(parents=True, exist_ok=True)
    except LowgradError as err:
        logger.error("error: %s", err)
        return Failed(message=str(err))
    new = [score_batch(detector, batch, batch.name, sha, out, current) for batch, sha in todo]
    alerts = [f"{r['batch']} ({', '.join(r['over_bound'])})" for r in new if r.get("over_bound")]
    errors = [f"{r['batch']}: {r['error']}" for r in new if "error" in r]
    create_markdown_artifact(key="lowgrad-monitor", description="the last monitoring run", markdown="\n".join([
        f"# lowgrad monitor: {len(new)} new batch(es) in `{watch_dir}`", "",
        f"Bound: {bound:.0%} flagged on any of {', '.join(rows or detector.rows)}.", "",
        *[f"- **{r['batch']}**: " + (f"error: {r['error']}" if "error" in r else ", ".join(
            f"{row} {100 * v['flagged_fraction']:.1f} %" for row, v in r["rows"].items())
            + (" — **over the bound**" if r["over_bound"] else "")) for r in new]]))
    if alerts or errors:
        message = "; ".join([*(["flagged fraction over the bound %.0f %% in %s" % (100 * bound, "; ".join(alerts))]
                               if alerts else []),
                             *([f"{len(errors)} of {len(new)} batch(es) failed: " + "; ".join(errors)] if errors else [])])
        logger.error(message)
        return Failed(message=message)
    return {"scored": [r["batch"] for r in new], "skipped": scored}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flows.monitor`` (``tests/test_docs_commands.py`` parses documented ones)."""
    parser = argparse.ArgumentParser(description="Score each new batch in a folder with a run's saved detector.",
                                     allow_abbrev=False)
    parser.add_argument("--run", required=True, help="the project directory of a finished run")
    parser.add_argument("--watch", required=True, help="the folder new batches arrive in")
    parser.add_argument("--rows", help="comma-separated rows to watch (default: every row)")
    parser.add_argument("--bound", type=float, default=0.25, help="fail when a batch has more flagged (default 0.25)")
    parser.add_argument("--results", help=f"where results go (default: <watch>/{RESULTS})")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="where the detector scores (default cpu; a dense-route run fitted on a GPU needs cuda)")
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--once", action="store_true", help="one pass now (a temporary Prefect API if none is set)")
    when.add_argument("--every", type=int, metavar="SECONDS", help="serve a deployment scheduled every SECONDS")
    parser.add_argument("--name", default=DEPLOYMENT)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from lowgrad.cli import parse_rows

    parameters = {"run": str(Path(args.run).resolve()), "watch": str(Path(args.watch).resolve()),
                  "rows": parse_rows(args.rows), "bound": args.bound,
                  "results": str(Path(args.results).resolve()) if args.results else None, "device": args.device}
    with exit_on_user_error():
        check_settings(parameters["run"], parameters["rows"], args.bound)  # before serving: not at every scheduled run
        batches(Path(parameters["watch"]), Path(parameters["results"] or Path(parameters["watch"]) / RESULTS))
    if args.every is not None:
        from flows.deploy import require_server

        with exit_on_user_error():
            url = require_server()
        print(f"serving deployment 'lowgrad-monitor/{args.name}' on {url}, every {args.every} s, parameters {parameters}")
        monitor.serve(name=args.name, interval=args.every, parameters=parameters)
        return
    from flows.server import start_temporary_server

    with exit_on_user_error():
        start_temporary_server()
    state = monitor(**parameters, return_state=True)
    if not state.is_completed():
        fail(state.message)


if __name__ == "__main__":
    main()
