"""Ablations as DVC experiments: one ``dvc exp run`` per variant of a base params file, then one table.

    python -m bench.ablations --params-file configs/cifar10_resnet18_cpu.yaml
    python -m bench.ablations --params-file configs/cifar10_resnet18_cpu.yaml --variants ntk,k10,k50

Variants (each changes one thing against the base; see ``VARIANTS``): ``ntk`` (raw gradients instead of the
NFK), ``average_gradient`` (one direction per class instead of PCA), ``last_block`` (gradients of the last
residual block and the head only), ``exact_head`` (exact NFK gradients of the last layer: no sketch and no
Kronecker approximation at all), ``k10`` / ``k50`` / ``k100`` / ``k200`` (``subspace.k``; one run's
``scoring.k_sweep`` gives the same curve for a fraction of the cost, see the report's "Mean FPR95 vs k").
By default: base, average_gradient, ntk, last_block, exact_head, in that order (the first two share the
base's extraction). Every experiment stays in DVC (``dvc exp show``,
``dvc exp apply abl-ntk``); the table goes to ``report/ablations/ablations.md`` and ``.json``.

Forward detectors do not change across these variants: with ``--skip-forward-odin`` (default on) forward ODIN,
the one forward detector that needs a backward pass per image, is left out of the experiments (the base
pipeline run reports it). The workspace keeps the last experiment's params; ``python -m flows.pipeline
--params-file <base>`` returns to the base (stages are restored from the cache where DVC can).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flows.params_file import composed_text
from flows.pipeline import ROOT, apply_params, stage_environment
from lowgrad import paths
from lowgrad.config import raw_route, read_raw, set_dotted

LAST_BLOCK = {
    "resnet18_cifar": ["layer4", "fc"],
    "resnet20_cifar": ["layer3", "linear"],
    "torchvision_resnet50": ["layer4", "fc"],
    "small_cnn": ["conv3", "bn3", "head"],
}
HEAD = {"resnet18_cifar": ["fc"], "resnet20_cifar": ["linear"], "torchvision_resnet50": ["fc"], "small_cnn": ["head"]}
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "ntk": {"subspace.kernel": "ntk"},
    "average_gradient": {"subspace.basis": "average_gradient"},
    "last_block": {"gradient.params": "LAST_BLOCK"},
    "exact_head": {"gradient.sketch": "none", "gradient.params": "HEAD"},  # exact NFK, no sketch: the last layer
    **{f"k{k}": {"subspace.k": k} for k in (10, 50, 100, 200)},
}
DEFAULT = "base,average_gradient,ntk,last_block,exact_head"  # the first two share the base extraction
SHOWN = ["grad_knn", "grad_mahalanobis", "grad_energy", "grad_msp", "knn", "mahalanobis", "energy"]


def variant_overrides(name: str, base: dict[str, Any], skip_forward_odin: bool) -> dict[str, Any]:
    if name not in VARIANTS:
        raise SystemExit(f"error: unknown variant '{name}' (choose from {', '.join(VARIANTS)})")
    arch = base["model"]["arch"]
    named = {"LAST_BLOCK": LAST_BLOCK[arch], "HEAD": HEAD[arch]}
    out = {k: named.get(v, v) if isinstance(v, str) else v for k, v in VARIANTS[name].items()}
    if skip_forward_odin and "odin" in base["scoring"]["forward"]:
        out["scoring.forward"] = {k: v for k, v in base["scoring"]["forward"].items() if k != "odin"}
    return out


def run_experiment(name: str, params_file: str, overrides: dict[str, Any], root: Path) -> dict[str, Any]:
    """Write the variant's params.yaml (without the settings its route does not use), then
    ``dvc exp run --name abl-<name>``; returns its metrics."""
    raw = read_raw(root / params_file)
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    apply_params(params_file, overrides, root, drop=raw_route(raw).present_ignored(raw))
    exp = f"abl-{name}"
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "exp", "remove", exp], cwd=root, env=stage_environment(), capture_output=True)
    start = time.perf_counter()
    proc = subprocess.run([*dvc, "exp", "run", "--name", exp], cwd=root, env=stage_environment(), text=True,
                          capture_output=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"error: experiment {exp} failed:\n{tail}")
    metrics = json.loads((root / paths.METRICS).read_text())
    ran = [line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")]
    return {"experiment": exp, "overrides": overrides, "wall_s": round(time.perf_counter() - start, 1),
            "stages_run": ran, "metrics": metrics}


def ablation_table(results: list[dict[str, Any]]) -> str:
    """Mean FPR95 / AUROC over the OOD sets per variant (rows) and detector (columns)."""
    shown = [m for m in SHOWN if all(m in r["metrics"]["methods"] for r in results)]
    header = ["variant", "changed", "probe acc."] + [f"{m} FPR95↓ / AUROC↑" for m in shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        changed = {k: v for k, v in r["overrides"].items() if k != "scoring.forward"}
        cells = [r["experiment"], ", ".join(f"`{k}={v}`" for k, v in changed.items()) or "(base)",
                 f"{r['metrics'].get('probe_accuracy', float('nan')):.2f}"]
        for m in shown:
            mean = r["metrics"]["methods"][m]["mean"]
            cells.append(f"{mean['fpr95']:.2f} / {mean['auroc']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-file", default=paths.PARAMS)
    parser.add_argument("--variants", default=DEFAULT, help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--keep-forward-odin", action="store_true", help="also run forward ODIN in every experiment")
    parser.add_argument("--root", default=str(ROOT), help="project directory (default: this checkout)")
    parser.add_argument("--out", default=paths.ABLATIONS, help="where the table goes (relative to --root)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    source = Path(args.params_file) if Path(args.params_file).is_absolute() else root / args.params_file
    base = read_raw(source)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    plans = {n: variant_overrides(n, base, not args.keep_forward_odin) for n in names}  # all checked before any run
    out = root / args.out
    out.mkdir(parents=True, exist_ok=True)
    frozen = out / "base_params.yaml"  # the base as it was (params.yaml itself changes with every experiment)
    frozen.write_text(composed_text(source))  # a profile merged with its bases: complete on its own
    results = []
    for name, overrides in plans.items():
        print(f"experiment abl-{name}: {overrides or '(base)'}", flush=True)
        results.append(run_experiment(name, str(frozen), overrides, root))
        print(f"  done in {results[-1]['wall_s']} s; stages run: {len(results[-1]['stages_run'])}", flush=True)
    (out / "ablations.json").write_text(json.dumps(results, indent=2) + "\n")
    table = ablation_table(results)
    (out / "ablations.md").write_text(
        f"# Ablations of {args.params_file}\n\nMean over the OOD sets; each row is one DVC experiment "
        f"(`dvc exp show`).\n\n{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
