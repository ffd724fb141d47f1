"""Does the authors' training recipe change what the gradient rows add? (issue 36, item 4)

ResNet-20 is trained here twice on all CIFAR-10 training images with one schedule and seed — ``plain`` (SGD with
momentum) and ``authors`` (the same SGD inside SAM, rho = 0.05, and label smoothing 0.1 in the authors' convention:
``configs/cifar10_resnet18_authors.yaml``) — then the ``verdict_resnet20`` protocol (bench/results/verdict_resnet20:
exact gradients, 4,000 kernel / bank images, k = 200, 4 power iterations) runs on each checkpoint::

    python -m bench.recipe --epochs 20 --out bench/results/recipe_resnet20     # beside ../shared

Each part resumes after a kill: training after its last finished epoch (the train stage's resume file in
``--workdir/<recipe>/train``); a finished checkpoint is kept with what it was trained from (``trained.json``: a rerun
with other settings is refused) and a finished protocol with its checkpoint's sha256 (another checkpoint's results
are dropped). ``recipe.json`` in ``--out`` is rewritten after every part: per recipe the checkpoint's sha256, its
settings, its full-test-set accuracy (10,000 images), the protocol's metrics, report and verdict readings and stage
timings; then the readings the two checkpoints differ on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from bench.routes import differing_readings, route_params, run_route, run_stages
from lowgrad import paths, pipeline
from lowgrad.paths import write_json
from lowgrad.route import ROUTES

PARAMS_FILE = Path("configs/cifar10_resnet18_cpu.yaml")
RESNET20 = {  # the verdict_resnet20 protocol's model and normalisation (bench/results/verdict_resnet20/README.md)
    "model.arch": "resnet20_cifar", "data.mean": [0.485, 0.456, 0.406], "data.std": [0.229, 0.224, 0.225]}
PROTOCOL = {"data.datasets.id_train.max_samples": 4000, "gradient.batch_size": 250, "gradient.max_params": 1_000_000,
            "subspace.power_iters": 4, "subspace.oversample": 20, **ROUTES["exact"].switch()}
SCHEDULE = {"train.batch_size": 128, "train.lr": 0.1, "train.momentum": 0.9, "train.nesterov": False,
            "train.weight_decay": 5e-4, "train.schedule": "step", "train.augment": "crop_flip"}  # the authors' SGD
RECIPES = {  # the one difference between the two checkpoints
    "plain": {"train.sam_rho": 0.0, "train.label_smoothing": 0.0},
    "authors": {"train.sam_rho": 0.05, "train.label_smoothing": 0.1 * 10 / 9},  # configs/cifar10_resnet18_authors.yaml
}
TRAIN_STAGES = ("prepare@id_train", "train")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_recipe(params_file: Path, overrides: dict[str, Any], workdir: Path) -> tuple[Path, dict[str, Any]]:
    """Train one recipe on all of ``id_train`` (unless ``overrides`` say otherwise) in ``workdir`` (resumes);
    returns the finished checkpoint and what it was trained from (``trained.json`` beside it: the params file's
    sha256, the overrides, the wall seconds of the call that finished it). A checkpoint there from other settings
    is refused, never reused."""
    done, record = workdir / "trained.pt", workdir / "trained.json"
    trained_from = {"params_file": str(params_file), "params_file_sha256": _sha256(params_file), "overrides": overrides}
    if done.exists():
        kept = json.loads(record.read_text()) if record.exists() else {}
        if {k: kept.get(k) for k in trained_from} != json.loads(json.dumps(trained_from)):
            raise SystemExit(f"error: {done} was trained with other settings ({record}): remove {workdir} or give "
                             "another --workdir")
        return done, kept
    params = route_params(params_file, {"data.datasets.id_train.max_samples": None, **overrides,
                                        "model.checkpoint": paths.TRAINED})
    plan = [step for step in pipeline.stage_bodies(params, Path.cwd()) if step[0] in TRAIN_STAGES]
    started = time.perf_counter()
    run_stages(plan, lambda name: params, workdir)
    trained_from["finishing_call_wall_s"] = round(time.perf_counter() - started, 1)  # a resumed run: its last call
    write_json(record, trained_from)
    shutil.copy(workdir / paths.TRAINED, done.with_suffix(".tmp"))
    os.replace(done.with_suffix(".tmp"), done)
    return done, trained_from


def test_accuracy(params_file: Path, overrides: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """Top-1 accuracy of ``checkpoint`` on the whole ID test set (the protocol scores a 2,000-image sample)."""
    import torch

    from lowgrad.data import load_dataset, to_tensor_batch
    from lowgrad.models import fresh_model
    from lowgrad.checkpoints import load_checkpoint

    params = route_params(params_file, {**overrides, "model.checkpoint": str(checkpoint.resolve()),
                                        "data.datasets.id_test.max_samples": None})
    model = load_checkpoint(fresh_model(params), checkpoint).eval()
    test = load_dataset("id_test", params.data, params.seed)
    correct = 0
    with torch.no_grad():
        for first in range(0, len(test), 500):
            x = to_tensor_batch(test.images[first : first + 500], params.data.mean, params.data.std)
            correct += int((model(x).argmax(1).numpy() == test.labels[first : first + 500]).sum())
    return {"images": len(test), "top1": round(100 * correct / len(test), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params-file", type=Path, default=PARAMS_FILE)
    parser.add_argument("--epochs", type=int, required=True, help="the same for both recipes")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every part")
    parser.add_argument("--workdir", type=Path, default=Path("bench/recipe-work"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    common = {**RESNET20, **SCHEDULE, "train.epochs": args.epochs}
    extra = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}  # last: they win
    args.out.mkdir(parents=True, exist_ok=True)
    summary_path = args.out / "recipe.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["recipes"] = RECIPES
    results = summary.setdefault("results", {})
    for name in args.recipes:
        overrides = {**common, **RECIPES[name], **extra}  # the --set overrides last: they win
        checkpoint, trained_from = train_recipe(args.params_file, overrides, args.workdir / name / "train")
        digest = _sha256(checkpoint)
        entry = results.get(name, {})
        if entry.get("checkpoint_sha256") != digest:  # results of another checkpoint are not kept
            entry = {"checkpoint_sha256": digest}
        entry.update({"trained_from": trained_from, "protocol_overrides": {**PROTOCOL, **extra}})
        entry["test_accuracy"] = test_accuracy(args.params_file, overrides, checkpoint)
        results[name] = entry
        summary_path.write_text(json.dumps(summary, indent=1))  # partial results survive a kill
        if "protocol" not in entry:
            entry["protocol"] = run_route(args.params_file, {**overrides, **PROTOCOL, **extra,
                                                             "model.checkpoint": str(checkpoint.resolve())},
                                          args.workdir / name / "protocol")
            for item in (paths.REPORT, paths.METRICS):
                shutil.copy(args.workdir / name / "protocol" / item, args.out / f"{Path(item).stem}_{name}{Path(item).suffix}")
        summary_path.write_text(json.dumps(summary, indent=1))
    if all(name in results and "protocol" in results[name] for name in RECIPES):
        summary["readings_differing"] = differing_readings({n: results[n]["protocol"] for n in RECIPES})
        summary_path.write_text(json.dumps(summary, indent=1))
    print(json.dumps({n: {"test_accuracy": r.get("test_accuracy"), "verdicts": r.get("protocol", {}).get("verdicts")}
                      for n, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
