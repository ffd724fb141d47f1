"""How much do the embedded default's numbers move when the model it trains changes?

The embedded default trains its own small CNN, and float reductions on another machine (other core count,
other SIMD kernels) give another model. This runs the whole default pipeline in-process (the stage functions,
as ``bench.routes``) for a few variants that change only how the model comes out — the torch thread count
(what differs between machines) and the seed (a different model altogether) — and prints, per row, the mean
FPR95 / AUROC of every variant, their range, and the width of the base run's bootstrap interval (which covers
test-set sampling only, not the model)::

    python -m bench.embedded_spread --out bench/results/embedded_spread.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from bench.routes import run_route
from lowgrad.config import load_params
from lowgrad import paths

VARIANTS: dict[str, tuple[dict[str, Any], int | None]] = {  # name: (params overrides, torch threads)
    "base": ({}, None),
    "threads1": ({}, 1),
    "seed1": ({"seed": 1}, None),
    "seed2": ({"seed": 2}, None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params-file", type=Path, default=Path(paths.PARAMS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--workdir", type=Path, default=Path("bench/spread-work"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    s = load_params(args.params_file).subspace  # keep the file's own PCA settings (bench.routes would override them)
    default_threads = torch.get_num_threads()
    means: dict[str, dict[str, dict[str, Any]]] = {}
    for name in args.variants:
        overrides, threads = VARIANTS[name]
        torch.set_num_threads(threads or default_threads)
        run_route(args.params_file, {**overrides, "subspace.power_iters": s.power_iters, "subspace.oversample": s.oversample},
                  args.workdir / name)
        metrics = json.loads((args.workdir / name / paths.METRICS).read_text())
        means[name] = {row: t["mean"] for row, t in metrics["methods"].items()}
        means[name]["id_accuracy"] = {"value": metrics["id_accuracy"]}
    torch.set_num_threads(default_threads)
    base = args.variants[0]
    rows = {}
    for row, mean in means[base].items():
        if row == "id_accuracy":
            continue
        fpr = {v: round(means[v][row]["fpr95"], 2) for v in args.variants}
        auc = {v: round(means[v][row]["auroc"], 2) for v in args.variants}
        lo, hi = mean["ci"]["fpr95"]
        rows[row] = {"fpr95": fpr, "fpr95_range": round(max(fpr.values()) - min(fpr.values()), 2),
                     "auroc": auc, "auroc_range": round(max(auc.values()) - min(auc.values()), 2),
                     "base_fpr95_interval_width": round(hi - lo, 2)}
    result = {"variants": {v: {"overrides": VARIANTS[v][0], "torch_threads": VARIANTS[v][1] or default_threads,
                               "id_accuracy": round(means[v]["id_accuracy"]["value"], 2)} for v in args.variants},
              "rows": rows}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
