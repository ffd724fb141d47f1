"""Fidelity of the sketched NFK route (Kronecker or dense) against the exact route on the third-party CIFAR ResNet-20
(269,722 parameters: small enough for exact per-sample gradients on a CPU). Prints one JSON object:

- ``gram_relative_error``: ||S S^T - Phi Phi^T||_F / ||Phi Phi^T||_F on centred NFK rows of the ID test subset
  (S: sketched NFK rows, Phi: exact NFK rows);
- ``subspace_overlap``: ||V_exact^T V_back||_F^2 / k, where V_back maps the sketch-space PCA back to parameter
  space through the exact rows (orth(Phi^T U_sketch), U_sketch = left singular vectors of the sketch);
- ``g_low_relative_error_rotated``: ||G_exact R - G_sketch||_F / ||G_sketch||_F on the ID test set, R the best
  rotation (orthogonal Procrustes): how far the routes' ``G_low`` differ beyond a change of basis;
- ``basis_control``: the probe rows (a per-coordinate BatchNorm, so not invariant to a turn of ``G_low``) on the
  exact ``G_low`` turned by that R alone (``sketch_route``) and by the turn a bootstrap resample of the kernel set
  gives the exact basis (``kernel_set_bootstrap``), each against the exact route's own rows, with ``|diag R|``;
  ``exact_explained_variance_ratio``: near-equal values are where a basis turns;
- the OOD table of both routes on every OOD set of ../shared, with |Delta AUROC|: every gradient detector of the
  cpu profile (KNN, Mahalanobis, the probe-based ones, residual and -||phi||, which read ``||phi||^2``: exact on the
  exact and exact-NFK routes, the sketched row's on the others).

Usage: python -m bench.fidelity [--n 1000] [--k 64] [--rank 16] [--route kronecker|exact_nfk|dense] [--dim 8192]
[--device cuda] [--probe-seeds 1,2,3]

``--probe-seeds``: the probe rows (``G_low`` through the linear probe) are scored again with each probe seed, on both
routes; ``probe_seed_control`` gives, per row, the routes' |Delta AUROC| with each seed beside the row's spread
over the seeds on one route, the resolution below which a difference between routes cannot be read.

``--perturbation-control 1e-6,1e-3``: the probe rows are scored once more on the exact route's ``G_low`` with every
coordinate multiplied by ``1 + r * N(0, 1)`` for each relative size ``r``, the same probe seed;
``perturbation_control`` gives, per ``r``, each probe row's largest |Delta AUROC| over the OOD sets: how far the
probe's SGD carries a change of ``G_low`` of known size (1e-6: of the order of float32 round-off, which no route can
avoid; one noise draw, scaled by each ``r``).

Both routes run through the estimator's steps (:class:`lowgrad.LowGrad`'s: ``fit_factors`` on a random kernel sample
of ``--factor-samples`` images, the route's extractor, ``lowgrad.steps.fit_subspace`` and ``project_rows``), with the
options of :func:`route_options`; rows are float32, as the pipeline stores them.

``--route exact_nfk``: a CountSketch into ``--dim`` buckets of the exactly normalised gradient (w and z of the
kernel sample) with the exact ``||phi||^2``. ``--route dense``: the dense Gaussian sketch of
exactly NFK-scaled gradients (the reference route, meant for GPUs; on ResNet-20 a CPU runs it) instead of the
Kronecker sketch; ``--dim`` is its dimension.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import orthogonal_procrustes

from lowgrad.checkpoints import load_checkpoint
from lowgrad.config import DataConfig, read_raw, set_dotted
from lowgrad.data import load_dataset
from lowgrad.detectors import Head, uses_probe
from lowgrad.estimator_options import parse_options
from lowgrad.extract import make_extractor
from lowgrad.factors import fit_factors, unflatten
from lowgrad.metrics import ood_metrics
from lowgrad.models import build_model, head_of, pick_device
from lowgrad.options import ProbeConfig
from lowgrad.route import ROUTES, Route
from lowgrad.rows import detector_row_name
from lowgrad.scoring import ScoringContext, score_detector
from lowgrad.steps import fit_subspace, project_rows
from lowgrad.subspace import GradientSubspace, RowPasses

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOWGRAD_SHARED", ROOT.parent / "shared"))
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
OOD_SETS = ("textures", "tinyimagenet", "fashionmnist")


def route_options(args: argparse.Namespace, route: str):
    """The estimator's options (:mod:`lowgrad.estimator_options`) of one route at this bench's sizes: the route's
    switch and the settings it reads, the PCA of the committed fidelity runs (20 oversampling columns, 4 power
    iterations, seed 0)."""
    cls = ROUTES[route]
    raw = {"seed": 0, "device": args.device, "model": {"num_classes": 10},
           "data": {"image_size": 32, "channels": 3, "mean": MEAN, "std": STD},
           "gradient": {"batch_size": args.batch if cls.is_sketch else 64, "chunk_rows": 256},
           "subspace": {"kernel": args.kernel, "k": args.k, "oversample": 20, "power_iters": 4}}
    for key, value in cls.switch().items():
        set_dotted(raw, key, value)
    for key, value in (("sketch_rank", args.rank), ("sketch_dim", args.dim)):
        if key in cls.reads:
            raw["gradient"][key] = value
    options = parse_options(raw, source=f"bench.fidelity's {route} route")
    if not Route.from_params(options).needs_factors:
        return options
    raw["gradient"]["factor_samples"] = min(args.factor_samples, args.n)
    return parse_options(raw, source=f"bench.fidelity's {route} route")


def route_rows(options, model, sets: dict) -> tuple[dict, dict, dict]:
    """Each set's gradient rows on ``options``' route as the estimator extracts them (its factors on the kernel set,
    its extractor), the exact ``||phi||^2`` where the route stores one, and the factors' info."""
    arrays, info = fit_factors(options, model, sets["id_train"].images)
    extractor = make_extractor(options, model, None, unflatten(arrays))
    out = {name: extractor.compute_images(s.images) for name, s in sets.items()}
    sqnorms = {name: o["phi_sqnorm"][:, 0] for name, o in out.items() if "phi_sqnorm" in o}
    return {name: o["grads"] for name, o in out.items()}, sqnorms, info


def _sets_low(options, sub, rows: dict, stored_sqnorms: dict, sets: dict) -> dict:
    """Each set's ``G_low``, ``||phi||^2`` (the one extraction stored, else the normalised row's) and labels, as the
    estimator's projection step gives them to the scoring step."""
    out = {}
    for name, r in rows.items():
        g_low, sqnorm = project_rows(options, sub, RowPasses.of_array(r, 256), lambda name=name: stored_sqnorms[name])
        out[name] = {"name": name, "g_low": g_low, "phi_sqnorm": sqnorm, "labels": sets[name].labels}
    return out


def _table(model, detectors: dict, sets_low: dict, probe_seed: int) -> dict:
    """``{row: {ood set: {route: {fpr95, auroc}, abs_delta_auroc}}}``, the probe trained with ``probe_seed``."""
    table: dict = {}
    for route, low in sets_low.items():
        ctx = ScoringContext(forward_head=Head.from_linear(head_of(model)), num_classes=10, seed=probe_seed,
                             probe_options=ProbeConfig().model_dump())
        targets = {name: d for name, d in low.items() if name != "id_train"}
        for det_name, kwargs in detectors.items():
            scores = score_detector(det_name, kwargs, True, low["id_train"], targets, ctx)
            for ood in OOD_SETS:
                m = ood_metrics(scores["id_test"], scores[ood])
                table.setdefault(detector_row_name(det_name, True), {}).setdefault(ood, {})[route] = {
                    "fpr95": round(m["fpr95"], 2), "auroc": round(m["auroc"], 2)}
    for det_rows in table.values():
        for cell in det_rows.values():
            cell["abs_delta_auroc"] = round(abs(cell["exact"]["auroc"] - cell["sketch"]["auroc"]), 2)
    return table


def _probe_seed_control(tables: dict) -> dict:
    """Per gradient row, the largest |Delta AUROC| over the OOD sets: between the two routes with each probe seed
    (``between_routes``: one value per seed, seed 0 first), and within each route between probe seed 0 and every
    other seed (``within_exact`` / ``within_sketch``: the row's own spread, the same on any route)."""
    out = {}
    for row in tables[0]:
        between = [max(c["abs_delta_auroc"] for c in t[row].values()) for t in tables.values()]
        within = {route: max(abs(t[row][ood][route]["auroc"] - tables[0][row][ood][route]["auroc"])
                             for t in tables.values() for ood in OOD_SETS) for route in ("exact", "sketch")}
        out[row] = {"between_routes": between, "within_exact": round(within["exact"], 2),
                    "within_sketch": round(within["sketch"], 2)}
    return out


def _largest_moves(model, probe_rows: dict, low: dict, moved: dict) -> dict:
    """Per probe row, the largest |Delta AUROC| over the OOD sets between ``low`` and ``moved`` (probe seed 0)."""
    table = _table(model, probe_rows, {"exact": low, "sketch": moved}, 0)  # the pair it is given, whatever its names
    return {row: max(c["abs_delta_auroc"] for c in cells.values()) for row, cells in table.items()}


def _rotation_onto(g_from: np.ndarray, g_to: np.ndarray) -> tuple[np.ndarray, float]:
    """The orthogonal map ``R`` (a rotation, with reflections for sign flips) that best maps ``g_from`` onto ``g_to``
    (orthogonal Procrustes) and the relative error left,
    ``||g_from R - g_to||_F / ||g_to||_F``."""
    rotation, _ = orthogonal_procrustes(g_from, g_to)
    return rotation, float(np.linalg.norm(g_from @ rotation - g_to) / np.linalg.norm(g_to))


def _basis_controls(model, probe_rows: dict, low: dict, rotations: dict[str, np.ndarray]) -> dict:
    """Per named rotation ``R`` (from the exact basis onto another), the probe rows on the exact ``G_low`` turned into
    that basis (``G_low R``: the same rows, another orientation of the same subspace) against the unturned ones, with
    ``|diag R|``."""
    out = {}
    for name, rotation in rotations.items():
        turned = {set_name: {**d, "g_low": d["g_low"] @ rotation} for set_name, d in low.items()}
        out[name] = {"abs_delta_auroc": _largest_moves(model, probe_rows, low, turned),
                     "abs_diagonal": [round(float(v), 3) for v in np.abs(np.diag(rotation))]}
    return out


def _bootstrap_basis(exact: dict, sub: GradientSubspace, g_test: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The exact route's ``G_low`` basis refitted (same settings) on a bootstrap resample of the kernel set (seed 0),
    as an orthogonal map from the fitted one (Procrustes on the ID test rows, whose fitted ``G_low`` is ``g_test``):
    how far another kernel sample turns the basis, which the exact route cannot avoid either (one resample, no
    spread)."""
    rows = np.random.default_rng(0).integers(0, len(labels), len(labels))
    settings = {key: getattr(sub, key) for key in ("kernel", "basis", "method", "k", "oversample", "power_iters", "seed")}
    resampled = GradientSubspace(**settings).fit(RowPasses.of_array(exact["id_train"][rows], 256), labels=labels[rows])
    rotation, _ = _rotation_onto(g_test, resampled.transform(exact["id_test"]))
    return rotation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="samples per set (kernel/bank, ID test, each OOD set)")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--factor-samples", type=int, default=512)
    parser.add_argument("--kernel", choices=["nfk", "ntk"], default="nfk", help="ntk isolates the sketch error from the NFK factor error")
    parser.add_argument("--route", choices=[name for name, cls in ROUTES.items() if cls.is_sketch], default="kronecker")
    parser.add_argument("--batch", type=int, default=64,
                        help="images per sketched batch (dense: Omega is regenerated per batch, so take 1024)")
    parser.add_argument("--dim", type=int, default=8192, help="dense / exact_nfk routes: sketch dimension")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--perturbation-control", type=lambda v: [float(s) for s in v.split(",") if s], default=[],
                        help="comma-separated relative sizes r: the probe rows scored again on the exact G_low "
                             "multiplied by 1 + r * N(0, 1)")
    parser.add_argument("--probe-seeds", type=lambda v: [int(s) for s in v.split(",") if s], default=[],
                        help="comma-separated probe seeds besides 0: the control of how far the probe rows move "
                             "with the probe's own seed, on each route, against how far they move between routes")
    args = parser.parse_args()
    device = pick_device(args.device)
    ckpt = SHARED / "models/resnet20-12fca82f.th"
    if not ckpt.is_file():
        sys.exit(f"error: needs {ckpt} and the CIFAR / OOD sets of ../shared")
    torch.manual_seed(0)
    n = args.n
    data = DataConfig(image_size=32, channels=3, mean=MEAN, std=STD, datasets={
        "id_train": {"source": "npz_jpeg", "path": str(SHARED / "data/cifar10_train_jpeg.npz"), "max_samples": n},
        "id_test": {"source": "npz_jpeg", "path": str(SHARED / "data/cifar10_test_jpeg.npz"), "max_samples": n},
        "textures": {"source": "npz", "path": str(SHARED / "data/textures10.npz"), "max_samples": n},
        "tinyimagenet": {"source": "npz", "path": str(SHARED / "data/tinyimagenet_test.npz"), "max_samples": n},
        "fashionmnist": {"source": "npz", "path": str(SHARED / "data/fashionmnist_test.npz"), "max_samples": n},
    })
    sets = {name: load_dataset(name, data, 0) for name in data.datasets}
    labels = sets["id_train"].labels
    model = load_checkpoint(build_model("resnet20_cifar", 10), ckpt).eval().to(device)
    timings = {}

    # each route through the estimator's steps: factors, extraction, the subspace on the kernel set, the projection
    exact_options, sketch_options = route_options(args, "exact"), route_options(args, args.route)
    start = time.perf_counter()
    exact, _, _ = route_rows(exact_options, model, sets)
    timings["exact_gradients_s"] = time.perf_counter() - start
    exact_sub = fit_subspace(exact_options, RowPasses.of_array(exact["id_train"], 256), lambda: labels)
    start = time.perf_counter()
    sketched, sketch_sqnorms, info = route_rows(sketch_options, model, sets)
    timings["sketch_route_s"] = time.perf_counter() - start
    errors = info.get("rank_one_relative_error", {"none": 0.0})
    sketch_sub = fit_subspace(sketch_options, RowPasses.of_array(sketched["id_train"], 256), lambda: labels)
    n_factor = sketch_options.gradient.factor_samples if Route.from_params(sketch_options).needs_factors else 0

    # inner products of centred NFK rows (ID test)
    phi = exact_sub.normalizer_.transform(exact["id_test"])
    s = sketch_sub.normalizer_.transform(sketched["id_test"])
    gram, gram_s = phi @ phi.T, s @ s.T
    off = ~np.eye(len(phi), dtype=bool)
    gram_error = float(np.linalg.norm(gram_s - gram) / np.linalg.norm(gram))
    corr = float(np.corrcoef(gram[off], gram_s[off])[0, 1])

    # subspace overlap: sketch PCA mapped back to parameter space through the exact kernel rows
    phi_k = exact_sub.normalizer_.transform(exact["id_train"])
    u_s = sketch_sub.normalizer_.transform(sketched["id_train"]) @ sketch_sub.components_
    v_back, _ = np.linalg.qr(phi_k.T @ u_s)
    overlap = float(np.linalg.norm(exact_sub.components_.T @ v_back) ** 2 / args.k)

    # OOD tables on G_low: every gradient detector of the cpu profile, the probe trained with each seed
    detectors = read_raw(ROOT / "configs/cifar10_resnet18_cpu.yaml")["scoring"]["gradient"]
    sets_low = {"exact": _sets_low(exact_options, exact_sub, exact, {}, sets),
                "sketch": _sets_low(sketch_options, sketch_sub, sketched, sketch_sqnorms, sets)}
    # the orthogonal map R that best turns the exact route's G_low of the ID test set into the sketch route's (the two
    # bases differ by signs and by turns within near-equal eigenvalues), and the error that no change of basis explains
    sketch_rotation, g_low_error = _rotation_onto(sets_low["exact"]["id_test"]["g_low"], sets_low["sketch"]["id_test"]["g_low"])
    seeds = [0] + [s for s in args.probe_seeds if s != 0]
    tables = {0: _table(model, detectors, sets_low, 0)}
    probe_rows = {name: kwargs for name, kwargs in detectors.items() if uses_probe(name)}
    for seed in seeds[1:]:  # only the probe rows depend on the probe's seed: the others are scored once
        tables[seed] = {**tables[0], **_table(model, probe_rows, sets_low, seed)}
    perturbed = {}
    for r in args.perturbation_control:
        noise = np.random.default_rng(0)
        moved = {name: {**d, "g_low": d["g_low"] * (1 + r * noise.standard_normal(d["g_low"].shape))}
                 for name, d in sets_low["exact"].items()}
        perturbed[f"{r:g}"] = _largest_moves(model, probe_rows, sets_low["exact"], moved)
    basis = _basis_controls(model, probe_rows, sets_low["exact"], {
        "sketch_route": sketch_rotation,
        "kernel_set_bootstrap": _bootstrap_basis(exact, exact_sub, sets_low["exact"]["id_test"]["g_low"], labels)})
    table = tables[0]
    worst = max(cell["abs_delta_auroc"] for det_rows in table.values() for cell in det_rows.values())
    print(json.dumps({
        "model": "resnet20_cifar (269,722 parameters)", "kernel": args.kernel, "samples_per_set": n, "k": args.k,
        "route": args.route, "sketch_rank": args.rank if "sketch_rank" in ROUTES[args.route].reads else None,
        "sketch_dim": sketched["id_train"].shape[1], "factor_samples": n_factor,
        "rank_one_nfk_error_median": round(float(np.median(list(errors.values()))), 3),
        "rank_one_nfk_error_max": round(float(max(errors.values())), 3),
        "gram_relative_error": round(gram_error, 4), "gram_offdiag_correlation": round(corr, 4),
        "subspace_overlap": round(overlap, 4), "g_low_relative_error_rotated": round(g_low_error, 4),
        "ood": table, "max_abs_delta_auroc": worst, "target_abs_delta_auroc_le_1": worst <= 1.0,
        "probe_seed_control": _probe_seed_control(tables) if len(seeds) > 1 else None,
        "perturbation_control": perturbed or None, "basis_control": basis,
        "exact_explained_variance_ratio": [round(float(v), 5) for v in exact_sub.explained_variance_ratio_],
        "timings_s": {k: round(v, 1) for k, v in timings.items()}, "device": str(device),
    }, indent=2))


if __name__ == "__main__":
    main()
