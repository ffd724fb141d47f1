"""Run every configured detector (forward, gradient, fused) over the stored per-set arrays.

A *set* is a mapping with ``logits``, ``features``, ``labels``, ``g_low`` and, for model-dependent
detectors, ``images`` (normalised tensors, loaded on demand). Detectors are fitted on the bank
(``id_train``) and score every other set. Nothing is tuned on OOD sets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from lowgrad.config import Params
from lowgrad.options import FusionGroup
from lowgrad.rows import Row, detector_row_name, fusion_rows, member_detector
from lowgrad.errors import ConfigError, DataError
from lowgrad.detectors import ODIN, Detector, Head, make_detector, uses_probe
from lowgrad.fusion import fuse
from lowgrad.probe import train_probe

log = logging.getLogger(__name__)

DataSet = dict[str, Any]


@dataclass
class ScoringContext:
    """What the detectors may need besides the stored arrays."""

    forward_head: Head
    num_classes: int
    model_forward: Callable | None = None  # the network: images -> logits, differentiable (forward ODIN, BATS)
    input_std: tuple[float, ...] | None = None  # per-channel std of the image normalisation (forward ODIN's step)
    load_images: Callable[[str], Any] | None = None  # set name -> normalised image tensor
    seed: int = 0
    probe_options: dict[str, Any] = field(default_factory=dict)
    _probes: list[tuple[np.ndarray, Head]] = field(default_factory=list)

    def probe(self, bank: DataSet) -> Head:
        """The linear probe trained on ``bank`` (cached per bank array; the cache keeps the array alive, so an
        identity match is never a recycled object)."""
        for g_low, head in self._probes:
            if g_low is bank["g_low"]:
                return head
        head = train_probe(bank["g_low"], bank["labels"], self.num_classes, seed=self.seed, **self.probe_options)
        self._probes.append((bank["g_low"], head))
        return head


def stored_set(store, name: str) -> DataSet:
    """Set ``name``'s logits, features and labels from its extracted store (a :class:`lowgrad.store.ChunkedStore`,
    every chunk checked, or the estimator's in-memory columns): what the detectors read besides ``G_low``."""
    return {"name": name, "logits": store.read("logits"), "features": store.read("features"),
            "labels": store.read("labels")[:, 0]}


def _images(data: DataSet, ctx: ScoringContext):
    if "images" not in data:
        if ctx.load_images is None:
            raise ValueError("model-dependent forward detectors (ODIN, BATS) need the images")
        data["images"] = ctx.load_images(data["name"])
    return data["images"]


@dataclass
class Fitted:
    """One fitted detector and the view of a set it reads: forward rows read the stored logits / features (or the
    images, model-dependent ones), gradient rows ``G_low`` (through ``probe``, the linear probe, where they need
    logits) or ``[G_low | ||phi||^2]``."""

    detector: Detector
    gradient: bool
    probe: Head | None = None

    def view(self, data: DataSet) -> np.ndarray:
        det = self.detector
        if not self.gradient:
            return data[det.input]
        if det.input == "logits":  # the probe's logits on G_low
            return self.probe.logits(data["g_low"])
        if det.input == "g_low_and_sqnorm":
            return np.column_stack([data["g_low"], data["phi_sqnorm"]])
        return data["g_low"]

    @property
    def uses_images(self) -> bool:
        return not self.gradient and self.detector.uses_model

    def score(self, data: DataSet, ctx: "ScoringContext") -> np.ndarray:
        """Scores of one set (higher = more in-distribution)."""
        if self.uses_images:
            if ctx.model_forward is None:
                raise ValueError(f"forward {type(self.detector).__name__} needs the model")
            return self.detector.score_inputs(ctx.model_forward, _images(data, ctx))
        return self.detector.score_samples(self.view(data))


def unfitted(name: str, kwargs: dict[str, Any], gradient: bool, ctx: ScoringContext, probe: Head | None = None) -> Fitted:
    """A configured detector with what it reads (the probe, the network's head, the input std), before ``fit``:
    the one place a row's detector is put together, for fitting here and for restoring a saved one."""
    if gradient:
        det = make_detector(name, kwargs, True, probe if uses_probe(name) else None)
        return Fitted(det, True, probe if uses_probe(name) else None)
    det = make_detector(name, kwargs, False, ctx.forward_head)
    if isinstance(det, ODIN):
        det.input_std = ctx.input_std
    return Fitted(det, False)


def fit_detector(name: str, kwargs: dict[str, Any], gradient: bool, bank: DataSet, ctx: ScoringContext) -> Fitted:
    """One detector fitted on ``bank`` (model-dependent forward ones need no fit)."""
    fitted = unfitted(name, kwargs, gradient, ctx, ctx.probe(bank) if gradient and uses_probe(name) else None)
    if not fitted.uses_images:
        fitted.detector.fit(fitted.view(bank), bank["labels"])
    return fitted


def score_detector(
    name: str, kwargs: dict[str, Any], gradient: bool, bank: DataSet, targets: dict[str, DataSet], ctx: ScoringContext
) -> dict[str, np.ndarray]:
    """Fit one detector on ``bank`` and score every target set."""
    fitted = fit_detector(name, kwargs, gradient, bank, ctx)
    return {t: fitted.score(d, ctx) for t, d in targets.items()}


def _subset(data: DataSet, rows: np.ndarray, name: str) -> DataSet:
    out = {k: v[rows] for k, v in data.items() if k not in ("name", "images")}
    out["name"] = name
    if "images" in data:
        out["images"] = data["images"][rows]
    return out


def check_bank_size(params: Params, n_bank: int) -> None:
    """Refuse, before any extraction, KNN settings that need more bank samples than ``id_train`` has (fusion
    members are fitted on the bank minus its held-out calibration part)."""
    scoring = params.scoring
    n_fit = n_bank - int(np.ceil(scoring.fusion.calibration_fraction * n_bank))  # train_test_split's rounding
    fused = {m for g in scoring.fusion.groups for m in g.members}
    for side, detectors in (("forward", scoring.forward), ("gradient", scoring.gradient)):
        if "knn" not in detectors:
            continue
        k = make_detector("knn", detectors["knn"], side == "gradient").k
        if k > n_bank:
            raise ConfigError(f"scoring.{side}.knn.k = {k} exceeds the bank size: id_train has {n_bank} samples")
        if detector_row_name("knn", side == "gradient") in fused and k > n_fit:
            raise ConfigError(f"scoring.{side}.knn.k = {k} exceeds the {n_fit} id_train samples that fusion members "
                              f"are fitted on (scoring.fusion.calibration_fraction = {scoring.fusion.calibration_fraction})")


def check_calibration_split(params: Params, labels: np.ndarray, what: str = "id_train") -> None:
    """Refuse a bank (its ``labels``) that the fusion groups' stratified calibration split cannot divide: each part
    needs a sample of each class, so each class two (one :class:`ConfigError` / :class:`DataError` line); nothing to
    check without fusion groups."""
    fusion = params.scoring.fusion
    if not fusion.groups:
        return
    classes, counts = np.unique(labels, return_counts=True)
    n_bank, n_classes = len(labels), len(classes)
    n_cal = int(np.ceil(fusion.calibration_fraction * n_bank))  # train_test_split's rounding
    if min(n_cal, n_bank - n_cal) < n_classes:
        raise ConfigError(f"scoring.fusion.calibration_fraction = {fusion.calibration_fraction} splits the {n_bank} "
                          f"id_train samples into {n_bank - n_cal} to fit and {n_cal} to calibrate the fusion groups; "
                          f"each part needs one sample of each of the {n_classes} classes (a stratified split): use a "
                          "larger id_train or another calibration_fraction")
    if counts.min() < 2:
        raise DataError(f"{what}: class {classes[counts.argmin()]} has one image; the fusion groups' calibration split "
                        "needs two per class")


def fusion_plan(groups: list[FusionGroup]) -> dict[str, tuple[Row, str]]:
    """Every fusion row with its rule, forward-only baselines included (:func:`lowgrad.rows.fusion_rows`)."""
    return fusion_rows([(g.name, list(g.members), g.rule) for g in groups])


@dataclass
class FittedRows:
    """Everything ``score`` fitted: each detector row on the whole bank; each fusion member on the fit part of the
    bank, with its scores on the held-out calibration part (what :func:`lowgrad.fusion.fuse` calibrates on)."""

    rows: dict[str, Fitted] = field(default_factory=dict)
    members: dict[str, Fitted] = field(default_factory=dict)
    calibration: dict[str, np.ndarray] = field(default_factory=dict)

    def scores(self, data: DataSet, ctx: ScoringContext, fusion: dict[str, tuple[Row, str]]) -> dict[str, np.ndarray]:
        """Every row's scores of one set: the detector rows, then each fusion row (``fusion``: :func:`fusion_plan`)."""
        out = {label: fitted.score(data, ctx) for label, fitted in self.rows.items()}
        member_scores = {m: fitted.score(data, ctx) for m, fitted in self.members.items()}
        for label, (row, rule) in fusion.items():
            out[label] = fuse([self.calibration[m] for m in row.members], [member_scores[m] for m in row.members], rule)
        return out


def run_all(
    params: Params, sets: dict[str, DataSet], ctx: ScoringContext
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float], FittedRows]:
    """Scores of every configured row: forward (by name), gradient (``grad_<name>``) and fusion groups
    (``fused_<group>``, ``fused_<group>_forward_only``). Returns ``(scores[row][set], extras, fitted)``."""
    bank = sets["id_train"]
    targets = {n: d for n, d in sets.items() if n != "id_train"}
    scoring = params.scoring
    scores: dict[str, dict[str, np.ndarray]] = {}
    fitted = FittedRows()
    rows = [(name, kwargs, False) for name, kwargs in scoring.forward.items()]
    rows += [(name, kwargs, True) for name, kwargs in scoring.gradient.items()]
    for i, (name, kwargs, gradient) in enumerate(rows, 1):
        label = detector_row_name(name, gradient)
        started = time.perf_counter()
        fitted.rows[label] = fit_detector(name, kwargs, gradient, bank, ctx)
        scores[label] = {t: fitted.rows[label].score(d, ctx) for t, d in targets.items()}
        log.info("[%d/%d] %s fitted on %d bank rows, %d sets scored in %.1f s", i, len(rows), label,
                 len(bank["labels"]), len(targets), time.perf_counter() - started)
    extras: dict[str, float] = {}
    if any(uses_probe(n) for n in scoring.gradient):
        head = ctx.probe(bank)
        test = sets["id_test"]
        extras["probe_accuracy"] = float(100 * np.mean(head.logits(test["g_low"]).argmax(1) == test["labels"]))
    if scoring.fusion.groups:
        scores.update(fused_scores(params, bank, targets, ctx, fitted))
    return scores, extras, fitted


def fused_scores(
    params: Params, bank: DataSet, targets: dict[str, DataSet], ctx: ScoringContext, fitted: FittedRows | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """Every fusion group's rows. Members are fitted on a random ``1 - calibration_fraction`` of the bank
    (stratified, seeded) and calibrated on the rest; each member is scored once, whatever groups share it. The
    fitted members and their calibration scores go into ``fitted``."""
    fusion, scoring = params.scoring.fusion, params.scoring
    check_calibration_split(params, bank["labels"])
    fit_rows, cal_rows = train_test_split(
        np.arange(len(bank["labels"])), test_size=fusion.calibration_fraction,
        random_state=params.seed, stratify=bank["labels"],
    )
    fit_bank = _subset(bank, np.sort(fit_rows), "id_train")
    calibration = _subset(bank, np.sort(cal_rows), "id_train:calibration")  # images attached below if needed
    members = {m for g in fusion.groups for m in g.members}
    if any(make_detector(n, scoring.forward[n], False, ctx.forward_head).uses_model
           for n, gradient in map(member_detector, members) if not gradient):
        calibration["images"] = _images(dict(bank), ctx)[np.sort(cal_rows)]  # model-dependent members score images
    fitted = FittedRows() if fitted is None else fitted
    for i, member in enumerate(sorted(members), 1):
        name, gradient = member_detector(member)
        kwargs = (scoring.gradient if gradient else scoring.forward)[name]
        started = time.perf_counter()
        fitted.members[member] = fit_detector(name, kwargs, gradient, fit_bank, ctx)
        fitted.calibration[member] = fitted.members[member].score(calibration, ctx)
        log.info("fusion member [%d/%d] %s refitted on the fit part of the bank in %.1f s", i, len(members), member,
                 time.perf_counter() - started)
    plan = fusion_plan(fusion.groups)
    for label, (row, rule) in plan.items():
        flat = [m for m in row.members if rule == "zscore" and np.ptp(fitted.calibration[m]) == 0]
        if flat:
            raise ConfigError(f"fusion row {label}: {', '.join(flat)} scores all {len(cal_rows)} held-out ID samples "
                              "the same, so its z-score is undefined (a degenerate model or detector): take it out of "
                              "the group, or give the group rule: fisher")
    per_set = {t: FittedRows(members=fitted.members, calibration=fitted.calibration).scores(d, ctx, plan)
               for t, d in targets.items()}
    for row, rule in plan.values():
        log.info("%s = %s (%s, equal weights), calibrated on %d held-out ID samples", row.name, " + ".join(row.members),
                 rule, len(cal_rows))
    return {label: {t: per_set[t][label] for t in targets} for label in plan}


def k_sweep(params: Params, sets: dict[str, DataSet], ctx: ScoringContext) -> dict[int, dict[str, dict[str, np.ndarray]]]:
    """The gradient detectors refitted on the first ``k'`` PCA components of G_low for every ``k'`` in
    ``scoring.k_sweep`` below the fitted k: the components are ordered by explained variance, so this is the k'-dimensional
    projection without refitting the basis. Returns ``scores[k'][grad_<name>][set]``."""
    out: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    full_k = sets["id_train"]["g_low"].shape[1]
    skipped = [k for k in params.scoring.k_sweep if k >= full_k]
    if skipped:
        log.info("k-sweep: %s skipped (not below the fitted k = %d)", skipped, full_k)
    for k in sorted(set(params.scoring.k_sweep) - set(skipped)):
        truncated = {  # gradient detectors need no images
            n: {**{key: v for key, v in d.items() if key != "images"}, "g_low": np.ascontiguousarray(d["g_low"][:, :k])}
            for n, d in sets.items()
        }
        bank = truncated["id_train"]
        targets = {n: d for n, d in truncated.items() if n != "id_train"}
        out[k] = {
            detector_row_name(name, True): score_detector(name, kwargs, True, bank, targets, ctx)
            for name, kwargs in params.scoring.gradient.items()
        }
        log.info("k-sweep: gradient detectors rescored on the first %d components", k)
    return out
