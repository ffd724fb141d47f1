"""Compare gradient routes end to end on one configuration: the matrix-free exact PCA against the stored routes.

Each route runs the pipeline's stage functions in this process (no DVC or Prefect needed, so it runs on a bare
GPU machine) in its own work directory, then one JSON object is printed: per route the stage timings (wall s;
peak GPU MB per stage; peak RSS of this one process so far, so it only grows), the set sizes and the gradient
detectors' OOD table; per OOD set the AUROC / FPR95 differences of every other route from the first; and, per
other route, the verdict readings (better / worse / no detectable difference) it shares with the first route and
each one it reads differently (``readings_differing_from_first``). Example (CUDA machine beside ../shared)::

    python -m bench.routes --params-file configs/cifar10_resnet18_gpu.yaml --routes matrix_free kronecker

Routes (:mod:`lowgrad.route`) are overrides of the params file: ``matrix_free`` (no sketch, matrix-free PCA;
alias ``exact_randomized``), ``kronecker`` / ``dense`` (the file's sketch settings with that sketch), ``exact``
(exact gradients stored, PCA of the store: small models only; alias ``stored``); settings a route does not use
are dropped; every route's randomized SVD takes ``--power-iters`` and ``--oversample``.

``--bootstrap-seeds 1,2,3``: each route's verdicts are redrawn from its stored scores with each bootstrap seed;
``bootstrap_seed_control`` counts the readings a seed alone moves within a route, beside the readings two routes
share at the same seed (the protocol's resolution: a reading at an interval's edge flips with the resampling).

``--set seed=1 --input-seed 0 --compare-with <earlier metrics.json>``: the method's own draws redrawn on the same
inputs. The stages that make the inputs (``prepare``: the sub-sampled images; ``train``: the classifier, when the run
trains one) take ``--input-seed`` while every other stage takes ``seed`` (the sketch, the factors' kernel sample, the
randomized SVD's start, the probe's minibatch order, the fusion split);
``readings_against_earlier`` counts the readings each route shares with the earlier run's (the exact route's own
spread under its draws: the scale to read an approximation's agreement against).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lowgrad import paths, pipeline, timing
from lowgrad.comparison import evaluate
from lowgrad.config import Params, drop_dotted, parse_params, raw_route, read_raw, set_dotted
from lowgrad.route import ROUTES
from lowgrad.stages.score import read_scores

ALIASES = {"stored": "exact", "exact_randomized": "matrix_free"}  # the names earlier results use
DETECTORS = ("grad_knn", "grad_mahalanobis", "knn", "mahalanobis")


def route_params(params_file: Path, overrides: dict[str, Any]) -> Params:
    """The params file with ``overrides``, less the settings its route does not use (a file written for the
    Kronecker route keeps ``sketch_rank``, which the dense route refuses)."""
    raw = read_raw(params_file)
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    for key in raw_route(raw).present_ignored(raw):
        drop_dotted(raw, key)
    root = Path.cwd()  # the project root: the params' relative data and checkpoint paths are resolved against it
    for spec in raw["data"]["datasets"].values():
        if spec.get("path") and not os.path.isabs(spec["path"]):
            spec["path"] = str((root / spec["path"]).resolve())
    checkpoint = raw["model"].get("checkpoint")
    if checkpoint and checkpoint != paths.TRAINED and not os.path.isabs(checkpoint):
        raw["model"]["checkpoint"] = str((root / checkpoint).resolve())
    return parse_params(raw, str(params_file))


INPUT_STAGES = ("prepare", "train")  # what the method is applied to: the sub-sampled images, the trained classifier


def makes_inputs(stage: str) -> bool:
    """Whether a stage (``name`` or ``name@set``) is one of :data:`INPUT_STAGES`."""
    return stage.partition("@")[0] in INPUT_STAGES


def stage_params(params: Params, stage: str, input_seed: int | None) -> Params:
    """The params one stage runs with: the stages that make the inputs (:data:`INPUT_STAGES`) take ``input_seed``
    (when given) as their seed, so images and classifier stay those of that seed while every other stage draws
    from ``params.seed``."""
    if input_seed is None or not makes_inputs(stage):
        return params
    return params.model_copy(update={"seed": input_seed})


def run_stages(plan: list, params_of: Callable[[str], Params], workdir: Path) -> dict[str, dict[str, Any]]:
    """Each ``(name, body, args)`` of ``plan`` run in ``workdir`` (created) with ``params_of(name)``, timed: each
    stage's timing record."""
    here = Path.cwd()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    try:
        stages = {}
        for name, func, args in plan:
            timing.start()
            func(params_of(name), *args)
            stages[name] = json.loads(timing.record(name).read_text())
            logging.info("%s: %.1f s", name, stages[name]["wall_s"])
        return stages
    finally:
        os.chdir(here)


def run_route(params_file: Path, overrides: dict[str, Any], workdir: Path, input_seed: int | None = None) -> dict[str, Any]:
    """All stages of one route in ``workdir`` (paths in the params file are relative to the project root)."""
    params = route_params(params_file, overrides)
    plan = pipeline.stage_bodies(params, Path.cwd())
    if input_seed is not None and not any(makes_inputs(name) for name, _, _ in plan):
        raise SystemExit(f"error: --input-seed: no stage of this plan makes the inputs ({', '.join(INPUT_STAGES)})")
    stages = run_stages(plan, lambda name: stage_params(params, name, input_seed), workdir)
    metrics = json.loads((workdir / paths.METRICS).read_text())
    table = {d: metrics["methods"][d] for d in DETECTORS if d in metrics["methods"]}
    return {
        "overrides": overrides, "samples": metrics["samples"], "id_accuracy": metrics["id_accuracy"],
        "probe_accuracy": metrics.get("probe_accuracy"), "stages": stages,
        "total_wall_s": round(sum(s["wall_s"] for s in stages.values()), 1), "methods": table,
        "rows": {d: metrics["rows"][d] for d in table},
        "best_forward_only": metrics.get("best_forward_only"), "verdicts": verdicts_of(metrics),
        "seeds": {"inputs": params.seed if input_seed is None else input_seed, "method": params.seed},
        "bootstrap": {k: metrics["bootstrap"][k] for k in ("replicates", "seed", "level")},
    }


def readings_against_earlier(earlier_metrics: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per route of this run: the verdict readings of an earlier run's ``metrics.json`` it shares, and each one it reads
    differently (:func:`differing_readings`, the earlier run first: a reading only this run has is not counted).
    ``ValueError`` when the earlier run had other set sizes or bootstrap settings (not the same protocol)."""
    boot = earlier_metrics.get("bootstrap", {})
    for route, result in results.items():
        theirs = {k: boot.get(k) for k in result["bootstrap"]}
        if earlier_metrics.get("samples") != result["samples"] or theirs != result["bootstrap"]:
            raise ValueError(f"the earlier run is not this protocol: samples {earlier_metrics.get('samples')} and "
                             f"bootstrap {theirs} there, {result['samples']} and {result['bootstrap']} on {route}")
    earlier = {"verdicts": verdicts_of(earlier_metrics)}
    return {route: differing_readings({"earlier": earlier, route: result})[route] for route, result in results.items()}


def verdicts_of(evidence: dict[str, Any]) -> dict[str, Any]:
    """The report's verdict table: per gradient row and comparison, the mean FPR95 / AUROC differences with their
    paired intervals and readings."""
    return {
        row: {kind: {"against": comp["against"], **{m: comp["mean"][m] for m in ("fpr95", "auroc")}}
              for kind, comp in kinds.items()}
        for row, kinds in evidence.get("deltas", {}).items()
    }


def reseeded_verdicts(params_file: Path, overrides: dict[str, Any], workdir: Path, seeds: list[int]) -> dict[int, Any]:
    """A finished route's verdict table with the bootstrap redrawn from each seed: the same scores, other
    resamples (``scoring.bootstrap.seed``)."""
    scores = read_scores(str(workdir / paths.SCORES))
    return {seed: verdicts_of(evaluate(scores, route_params(params_file, {**overrides, "scoring.bootstrap.seed": seed})))
            for seed in seeds}


def bootstrap_seed_control(results: dict[str, dict[str, Any]], reseeded: dict[str, dict[int, Any]]) -> dict[str, Any]:
    """How many readings the bootstrap's own seed moves: per route, the readings each other seed shares with the
    route's own run (``within``), and per other route, the readings it shares with the first route when both
    draw the same seed (``between_first_and``: the run's seed, then each other): a difference between routes no
    larger than the spread within one route is below what the protocol can read."""
    first, *others = results
    seeds = list(reseeded[first])

    def same(a: dict[str, Any], b: dict[str, Any]) -> int:
        return differing_readings({"a": {"verdicts": a}, "b": {"verdicts": b}})["b"]["same"]

    return {
        "seeds": seeds,
        "compared": differing_readings({"a": results[first], "b": results[first]})["b"]["compared"],
        "within": {route: [same(results[route]["verdicts"], reseeded[route][seed]) for seed in seeds] for route in results},
        "between_first_and": {route: [same(results[first]["verdicts"], results[route]["verdicts"])]
                              + [same(reseeded[first][seed], reseeded[route][seed]) for seed in seeds] for route in others},
    }


def differences(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per other route, detector and OOD set: that route's AUROC and FPR95 minus the first route's."""
    first, *others = results
    out: dict[str, dict[str, dict[str, float]]] = {}
    for route in others:
        for det, per_set in results[first]["methods"].items():
            other = results[route]["methods"].get(det)
            if other is None or results[first]["rows"][det]["kind"] != "gradient":  # the gradient detectors' rows
                continue
            out.setdefault(route, {})[det] = {
                f"{s}/{m}": round(other[s][m] - per_set[s][m], 2) for s in per_set for m in ("auroc", "fpr95")
            }
    return out


def differing_readings(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per other route: how many verdict readings (row x comparison x mean FPR95 / AUROC) it shares with the first
    route, and each one it reads differently (better / worse / no detectable difference), with both intervals."""
    first, *others = results
    out: dict[str, dict[str, Any]] = {}
    for route in others:
        compared, differing = 0, []
        for row, kinds in results[first]["verdicts"].items():
            for kind, comp in kinds.items():
                other = results[route]["verdicts"].get(row, {}).get(kind)
                for metric in ("fpr95", "auroc"):
                    compared += 1
                    theirs = other[metric] if other is not None and other["against"] == comp["against"] else None
                    if theirs is None or theirs["verdict"] != comp[metric]["verdict"]:
                        differing.append({"row": row, "comparison": kind, "against": comp["against"],
                                          "metric": metric, first: comp[metric], route: theirs})
        out[route] = {"same": compared - len(differing), "compared": compared, "differing": differing}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params-file", type=Path, required=True)
    parser.add_argument("--routes", nargs="+", default=["matrix_free", "kronecker"], choices=[*ROUTES, *ALIASES])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every route")
    parser.add_argument("--power-iters", type=int, default=1, help="randomized SVD power iterations (every route)")
    parser.add_argument("--oversample", type=int, default=50, help="randomized SVD extra test vectors (every route)")
    parser.add_argument("--workdir", type=Path, default=Path("bench/routes-work"))
    parser.add_argument("--out", type=Path, default=None, help="copy each route's report and metrics here")
    parser.add_argument("--bootstrap-seeds", type=lambda v: [int(s) for s in v.split(",") if s], default=[],
                        help="comma-separated bootstrap seeds besides the params file's: each route's verdicts "
                             "redrawn from each, the control of how many readings the resampling alone moves")
    parser.add_argument("--input-seed", type=int, default=None,
                        help="the seed of the prepare and train stages (default: the params' seed); with --set "
                             "seed=N the images and the classifier stay while every other stage redraws its own")
    parser.add_argument("--compare-with", type=Path, default=None, metavar="METRICS_JSON",
                        help="an earlier run's metrics.json: count the readings each route shares with it")
    args = parser.parse_args()
    earlier = json.loads(args.compare_with.read_text()) if args.compare_with is not None else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    common = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    results: dict[str, dict[str, Any]] = {}
    reseeded: dict[str, dict[int, Any]] = {}
    started = time.perf_counter()
    for route in args.routes:
        overrides = {**common, **ROUTES[ALIASES.get(route, route)].switch(), "subspace.power_iters": args.power_iters,
                     "subspace.oversample": args.oversample}
        results[route] = run_route(args.params_file, overrides, args.workdir / route, args.input_seed)
        own_seed = route_params(args.params_file, overrides).scoring.bootstrap.seed
        redrawn = [s for s in args.bootstrap_seeds if s != own_seed]
        if redrawn:
            reseeded[route] = reseeded_verdicts(args.params_file, overrides, args.workdir / route, redrawn)
        if args.out is not None:
            dest = args.out / route
            dest.mkdir(parents=True, exist_ok=True)
            for item in (paths.REPORT, paths.METRICS):
                shutil.copy(args.workdir / route / item, dest / Path(item).name)
            (args.out / "routes.json").write_text(json.dumps(results, indent=1))  # partial results survive a kill
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    against_earlier = None
    if earlier is not None:
        try:
            against_earlier = readings_against_earlier(earlier, results)
        except ValueError as err:  # the runs' own results still print
            logging.error("error: --compare-with %s: %s", args.compare_with, err)
            against_earlier = {"error": str(err)}
    print(json.dumps({"device": device, "routes": results, "differences_from_first": differences(results),
                      "readings_differing_from_first": differing_readings(results),
                      "bootstrap_seed_control": bootstrap_seed_control(results, reseeded) if reseeded else None,
                      "readings_against_earlier": against_earlier,
                      "wall_s": round(time.perf_counter() - started, 1)}, indent=1))


if __name__ == "__main__":
    main()
