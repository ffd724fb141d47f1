"""Stage ``score``: fit every configured detector on the ID bank (``id_train``), score ID test and every OOD set,
bootstrap every metric and the paired differences, write the scores, ``report/metrics.json`` and the fitted
detector (``artifacts/detector``, :mod:`lowgrad.saved_detector`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from lowgrad import timing
from lowgrad.comparison import evaluate, sets_in_mean
from lowgrad.config import Params
from lowgrad.data import load_image_set, to_tensor_batch
from lowgrad.detectors import Head
from lowgrad.metrics import accuracy, mean_metrics, ood_metrics
from lowgrad.models import head_of, load_classifier
from lowgrad.paths import DETECTOR, EXTRACTED, METRICS, PHI_SQNORM, PREPARED, PROJECTED, SCORES, atomic_dir, atomic_path
from lowgrad.provenance import run_provenance
from lowgrad.saved_detector import save_fitted
from lowgrad.scoring import ScoringContext, check_bank_size, k_sweep, run_all, stored_set
from lowgrad.stages.prepare import prepared_size
from lowgrad.store import ChunkedStore

log = logging.getLogger(__name__)


def _inputs(name: str) -> dict[str, Any]:
    return {
        **stored_set(ChunkedStore.open(EXTRACTED.format(name=name)), name),
        "g_low": np.load(PROJECTED.format(name=name)),
        "phi_sqnorm": np.load(PHI_SQNORM.format(name=name)),
    }


def stage_timings(params: Params) -> dict[str, dict[str, Any]]:
    """Recorded timings of this configuration's stages, in the order they finished (files left by data sets no longer
    configured are ignored)."""
    configured = ("", *params.data.datasets)
    return {stage: t for stage, t in timing.collect().items() if stage.partition("@")[2] in configured}


def read_scores(path: str = SCORES) -> dict[str, dict[str, np.ndarray]]:
    """The scores :func:`score` wrote, ``{row: {set: scores}}`` (stored flat, one array per ``row/set``)."""
    scores: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as stored:
        for key in stored.files:
            row, _, name = key.rpartition("/")
            scores.setdefault(row, {})[name] = stored[key]
    return scores


def score(params: Params) -> None:
    """Fit every row, score every set, evaluate; the saved detector, scores and metrics of the previous run stay in
    place (dvc.yaml: ``persist``) until all three new ones are complete, then each is renamed into place."""
    check_bank_size(params, prepared_size("id_train"))
    sets = {name: _inputs(name) for name in ["id_train", "id_test", *params.data.ood_names]}
    sets_in_mean({n: len(d["labels"]) for n, d in sets.items()}, params.data.ood_names,
                 params.scoring.min_ood_samples)  # every set too small: one error before any detector runs
    with atomic_dir(DETECTOR) as detector, atomic_path(SCORES) as scores, atomic_path(METRICS) as metrics:
        _score_into(params, sets, detector, scores, metrics)


def _score_into(params: Params, sets: dict[str, dict[str, Any]], detector: Path, scores: Path, metrics: Path) -> None:
    import torch

    model = load_classifier(params)
    for p in model.parameters():
        p.requires_grad_(False)

    def load_images(name: str) -> torch.Tensor:
        images = load_image_set(PREPARED.format(name=name)).images
        return to_tensor_batch(images, params.data.mean, params.data.std)

    ctx = ScoringContext(
        forward_head=Head.from_linear(head_of(model)),
        num_classes=params.model.num_classes,
        model_forward=model,
        input_std=tuple(params.data.std),
        load_images=load_images,
        seed=params.seed,
        probe_options=params.scoring.probe.model_dump(),
    )
    with torch.inference_mode(False):
        all_scores, extras, fitted = run_all(params, sets, ctx)
    save_fitted(fitted, params, {label: per_set["id_test"] for label, per_set in all_scores.items()}, into=detector)
    evidence = evaluate(all_scores, params)
    for label, table in evidence["methods"].items():
        mean = table["mean"]
        log.info("%-36s mean FPR95 %6.2f [%6.2f, %6.2f]  AUROC %6.2f", label, mean["fpr95"], *mean["ci"]["fpr95"], mean["auroc"])
    log.info("bootstrap: %d replicates in %.1f s", params.scoring.bootstrap.replicates, evidence["bootstrap"]["wall_s"])
    sweep: dict[str, dict[str, dict[str, float]]] = {}
    if params.subspace.basis == "pca":
        for k, rows in k_sweep(params, sets, ctx).items():
            sweep[str(k)] = {
                label: mean_metrics({s: ood_metrics(per_set["id_test"], per_set[s]) for s in evidence["mean_over"]})
                for label, per_set in rows.items()
            }
    elif params.scoring.k_sweep:
        log.info("scoring.k_sweep skipped: the average-gradient basis has one component per class")
    id_acc = accuracy(sets["id_test"]["logits"], sets["id_test"]["labels"])
    np.savez(scores, **{f"{label}/{s}": v for label, per_set in all_scores.items() for s, v in per_set.items()})
    metrics.write_text(json.dumps({
        "id_accuracy": id_acc, **extras, **evidence, "k_sweep": sweep,
        "samples": {name: len(d["labels"]) for name, d in sets.items()},
        "timings": {**stage_timings(params), "score": timing.snapshot()},
        "provenance": run_provenance(params),
    }, indent=2, sort_keys=False) + "\n")
