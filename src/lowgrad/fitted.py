"""A fitted detector's scoring state (:class:`FittedDetector`): what :class:`lowgrad.LowGrad` (the estimator, also
``lowgrad.OODDetector``) holds once fitted or loaded, and how new images are scored with it.

New inputs go through the run's own code path: the ``extract`` stage's forward pass and gradient route (the saved
model, sketch factors and seed), the ``project`` stage's ``G_low = phi(g) V`` with the saved normaliser and basis,
then each saved row as ``score`` fitted it. Nothing is refitted.

One detector may be shared by threads (a web handler, a thread pool): its calls take turns (a lock around the
model-dependent work, whose gradient routes swap the model's parameters or hook its layers while they run), so
each call gets exactly the result of that call made alone. Torch already spreads one call over every core, so
taking turns costs little throughput; load one detector per process for parallel scoring.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lowgrad.errors import DataError, DetectorError, StoreError
from lowgrad.saved_detector import flagged


def _as_array(batch: Any) -> np.ndarray:
    if isinstance(batch, (tuple, list)):  # (images, labels) from a labelled dataset
        batch = batch[0]
    if hasattr(batch, "numpy"):
        batch = batch.detach().cpu().numpy()
    return np.asarray(batch)


def _describe(images: Any) -> str:
    """The caller's input as given, for an error line: its type, dtype and shape."""
    kind = type(images).__name__
    shape = getattr(images, "shape", None)
    dtype = getattr(images, "dtype", None)
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    if shape is None:
        return "None" if images is None else f"{article} {kind}"
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{article} {kind} of {dtype_name} {' x '.join(map(str, tuple(shape)))}"


def scoring_context(params, model, load_images=None):
    """The :class:`lowgrad.scoring.ScoringContext` of ``model``: its head, and a frozen copy for the detectors' forward
    passes (the gradients are taken through ``model`` itself); ``load_images``: set name -> tensor, when fitting."""
    from lowgrad.detectors import Head
    from lowgrad.models import frozen_copy, head_of
    from lowgrad.scoring import ScoringContext

    frozen = frozen_copy(model)
    return ScoringContext(forward_head=Head.from_linear(head_of(frozen)), num_classes=params.model.num_classes,
                          model_forward=frozen, input_std=tuple(params.data.std), seed=params.seed,
                          probe_options=params.scoring.probe.model_dump(), load_images=load_images)


def scoring_sources(params, model, factors: dict[str, dict[str, np.ndarray]]):
    """``(extractor, rows_source)`` that score each call's images: the route's extractor (given the images by
    :meth:`lowgrad.extract.Extractor.compute_images`), and on the matrix-free route the exact gradient rows (each
    call's images set on a copy; None on the other routes)."""
    import torch

    from lowgrad.extract import make_extractor
    from lowgrad.matrix_free import exact_rows
    from lowgrad.route import Route

    with torch.inference_mode(False):
        extractor = make_extractor(params, model, None, factors)
    recomputed = Route.from_params(params).recomputes_gradients
    return extractor, exact_rows(params, model, None, desc="new images") if recomputed else None


def classifier_of(model, params):
    """``model`` (a classifier given in Python) with the pipeline's classifier interface, on a copy (the caller's
    object is left as it is), in eval mode on the CPU; and ``params`` with ``model.num_classes`` filled in from the
    model's output when not given."""
    import torch

    from lowgrad.models import with_head_split

    model_copy = copy.deepcopy(model).cpu().eval()
    num_classes = params.model.num_classes
    if num_classes is None:
        with torch.no_grad():
            size, channels = params.data.image_size, params.data.channels
            out = model_copy(torch.zeros(2, channels, size, size))
        num_classes = int((out[0] if isinstance(out, tuple) else out).shape[1])
    model_copy = with_head_split(model_copy, num_classes, params.model.arch or type(model).__name__,
                                 params.data.channels, params.data.image_size)
    params = params.model_copy(update={"model": params.model.model_copy(update={"num_classes": num_classes})})
    return model_copy, params


def check_same_weights(model, root: Path) -> None:
    """``model`` has the weights saved in ``root`` (one :class:`DetectorError` line otherwise)."""
    import torch

    from lowgrad.paths import MODEL

    saved = torch.load(root / MODEL, map_location="cpu", weights_only=True)
    given = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    differ = sorted(k for k in set(saved) | set(given)
                    if k not in saved or k not in given or not torch.equal(saved[k].to(given[k].dtype), given[k]))
    if differ:
        raise DetectorError(f"the model given is not the one this detector was fitted with ({len(differ)} tensors "
                            f"differ from {root / MODEL}, first {differ[0]}): pass the model it was fitted on")


class FittedDetector:
    """A fitted detector's scoring state: its rows with the model, route and basis they score with. The estimator
    (:class:`lowgrad.LowGrad`) holds one once fitted or loaded; :meth:`load` reads one from a folder."""

    def __init__(self, root: Path, saved, ctx, extractor, rows_source, subspace) -> None:
        self.root, self._saved, self._ctx = root, saved, ctx
        self._extractor, self._rows_source, self._subspace = extractor, rows_source, subspace
        self.params = saved.params
        self.thresholds: dict[str, float] = dict(saved.thresholds)  # every row's, at 95 % TPR on the run's id_test
        self.id_test_scores: dict[str, np.ndarray] = dict(saved.id_test_scores)  # the reference a monitor compares with
        self._turns = threading.Lock()  # one call at a time through the shared model (module docstring)

    @classmethod
    def load(cls, run_dir: str | Path, *, device: str = "cpu", model=None) -> "FittedDetector":
        """The saved detector of the project at ``run_dir`` (after ``dvc repro`` or ``dvc pull``) or of a folder
        ``LowGrad.save`` wrote; ``model``: the classifier, when the saved options name no ``model.arch`` (its
        weights must be the saved ones). Refuses, with one :class:`DetectorError` line, an artifact whose model,
        basis, normaliser or factors were replaced since."""
        from lowgrad.paths import DETECTOR_META as META

        root = Path(run_dir)

        def meta_bytes() -> bytes | None:
            return (root / META).read_bytes() if (root / META).is_file() else None

        for _ in range(3):  # a rerun of `score` may replace the detector's folder while it is read: read it again
            seen = meta_bytes()
            try:
                return cls._load_once(root, device, model)
            except DetectorError:
                time.sleep(0.05)
                if meta_bytes() == seen:  # nothing was replaced meanwhile: the refusal is the artifact's own
                    raise
        return cls._load_once(root, device, model)

    @classmethod
    def _load_once(cls, root: Path, device: str, model=None) -> "FittedDetector":
        from lowgrad.config import USER_CODE, USER_MODULE, parse_params
        from lowgrad.saved_detector import check_artifact

        meta = check_artifact(root)  # before anything is built from the run's files
        if "datasets" not in meta["params"].get("data", {}):  # a folder LowGrad.save wrote: the estimator's options
            from lowgrad.estimator_options import parse_options

            params = parse_options({**meta["params"], "device": device}, source=str(root))
            if model is not None:
                model = classifier_of(model, params)[0]
                check_same_weights(model, root)
            return cls._build(root, meta, params, model=model)
        if model is not None:
            raise DetectorError(f"{root}: a pipeline run's detector scores with the run's own model (models/model.pt):"
                                " load it without model=")
        if str(meta["params"]["model"]["arch"]).startswith(f"{USER_MODULE}:") and root.resolve() != Path.cwd().resolve():
            raise DetectorError(f"{root}: the model is your own code ({meta['params']['model']['arch']}), imported from "
                                f"the project's {USER_CODE}/ in the working directory: run this from {root.resolve()}")
        route_log = logging.getLogger("lowgrad.route")  # the saved params hold every value, defaults included: the
        level = route_log.level  # route would state each unused one, which the run has stated already
        route_log.setLevel(logging.ERROR)
        try:
            return cls._build(root, meta, parse_params({**meta["params"], "device": device}))
        finally:
            route_log.setLevel(level)

    @classmethod
    def _build(cls, root: Path, meta: dict[str, Any], params, model=None) -> "FittedDetector":
        """The detector of the checked artifact at ``root`` (``meta``: what :func:`check_artifact` returned); ``model``:
        the classifier with its head split (:func:`lowgrad.models.with_head_split`), or built from the saved
        ``model.arch`` and weights when None."""
        from lowgrad.extract import load_factors
        from lowgrad.models import load_classifier
        from lowgrad.paths import FACTORS, SUBSPACE
        from lowgrad.route import Route
        from lowgrad.saved_detector import load_fitted
        from lowgrad.subspace import GradientSubspace

        if model is None:
            if not params.model.arch:
                raise DetectorError(f"{root}: the detector was fitted on a model given in Python (no model.arch to "
                                    "build it from): pass it, LowGrad.load(folder, model=...)")
            model = load_classifier(params, root)
        ctx = scoring_context(params, model)
        saved = load_fitted(root, ctx, meta, params)
        route = Route.from_params(params)
        extractor, rows_source = scoring_sources(params, model, load_factors(root / FACTORS) if route.needs_factors else {})
        subspace = None
        if cls._needs_gradients(saved.fitted.rows.values(), saved.fitted.members.values()):
            dim = rows_source.dim if rows_source is not None else extractor.gradients.dim
            subspace = GradientSubspace.load(root / SUBSPACE, lazy=route.recomputes_gradients, dim=dim,
                                             kernel=route.subspace_kernel, basis=params.subspace.basis)
            if route.recomputes_gradients:  # V read onto the device once, not for every scoring batch
                from lowgrad.matrix_free import resident_components

                subspace.components_ = resident_components(subspace.components_, rows_source.device)
            if route.is_sketch:  # new images are sketched here, on this device: the same sketch as the basis's rows?
                try:
                    subspace.check_rows_from(getattr(extractor.gradients, "layout", None),
                                             f"new images on device {params.device}")
                except StoreError as err:
                    raise DetectorError(f"{root}: {err}") from None
        return cls(root, saved, ctx, extractor, rows_source, subspace)

    @staticmethod
    def _needs_gradients(*groups: Iterable) -> bool:
        return any(row.gradient for group in groups for row in group)

    @property
    def rows(self) -> list[str]:
        """Every row this detector scores, in the report's order (forward, gradient, fused)."""
        return list(self.thresholds)

    def check_rows(self, rows: list[str] | str | None) -> list[str]:
        """``rows`` (every row when None; one row's name alone is that row), each one this detector has (one
        :class:`DetectorError` line otherwise)."""
        wanted = self.rows if rows is None else [rows] if isinstance(rows, str) else list(rows)
        unknown = [r for r in wanted if r not in self.thresholds]
        if unknown or not wanted:
            raise DetectorError(f"unknown row(s) {', '.join(unknown) or '(none given)'}: this detector has "
                                f"{', '.join(self.rows)}")
        return wanted

    def _selected(self, rows: list[str] | None):
        from lowgrad.scoring import FittedRows, fusion_plan

        fitted = self._saved.fitted
        plan = fusion_plan(self.params.scoring.fusion.groups)
        wanted = self.check_rows(rows)
        fused = {label: plan[label] for label in wanted if label in plan}
        members = {m for row, _ in fused.values() for m in row.members}
        selected = FittedRows(rows={r: fitted.rows[r] for r in wanted if r in fitted.rows},
                              members={m: fitted.members[m] for m in members},
                              calibration={m: fitted.calibration[m] for m in members})
        return selected, fused

    def _check_images(self, images: np.ndarray, given: str) -> np.ndarray:
        """``images`` (one batch of what the caller gave, described by ``given``) as the run takes them, or one
        :class:`DataError` line that says what is wrong with the caller's input and what to do."""
        size, channels = self.params.data.image_size, self.params.data.channels
        want = f"uint8 N x {size} x {size} x {channels} (the run's data.image_size and data.channels)"
        if images.ndim == 3 and channels == 1:
            images = images[..., None]
        if images.dtype != np.uint8:
            raise DataError(f"images must be {want}, got {given}: pass raw 8-bit pixels (0-255) as uint8; the run "
                            "applies its own normalisation")
        if images.ndim != 4:
            raise DataError(f"images must be {want}, got {given}")
        if images.shape[1:] != (size, size, channels):
            first = images.shape[1] in (1, 3) and images.shape[1:] == (images.shape[1], size, size)
            hint = ("channels first: move the channel axis last (N x H x W x C)" if first else "resize them as the "
                    "run's prepare stage did (lowgrad score and lowgrad.data.read_images read files that way)")
            raise DataError(f"images must be {want}, got {given}: {hint}")
        return images

    def _batches(self, images: Any) -> Iterable[np.ndarray]:
        """The caller's images, each array, tensor or DataLoader batch checked whole against what was given, then
        split into ``gradient.chunk_rows`` rows (the extract stage's unit: a 4,000-image batch is never computed
        at once, and scores are those of the pipeline's own chunks)."""
        step = self.params.gradient.chunk_rows
        if images is None or isinstance(images, (str, bytes, Path)):
            raise DataError(f"images must be an array, a tensor or a DataLoader of images, got {_describe(images)}: "
                            "read files with lowgrad.data.read_images or the lowgrad score command")
        single = isinstance(images, np.ndarray) or hasattr(images, "numpy")
        for batch in [images] if single else images:
            shown = batch[0] if isinstance(batch, (tuple, list)) else batch
            whole = self._check_images(_as_array(batch), _describe(shown) if single else f"a batch of {_describe(shown)}")
            for start in range(0, len(whole), step):
                yield np.ascontiguousarray(whole[start : start + step])

    def _features(self, images: np.ndarray, gradients: bool, with_images: bool) -> dict[str, Any]:
        """What ``score`` reads of a set, computed for ``images`` as the extract and project stages do."""
        from lowgrad.data import to_tensor_batch
        from lowgrad.steps import project_rows
        from lowgrad.subspace import RowPasses

        out = self._extractor.compute_images(images, gradients=gradients)  # no gradients for forward rows only
        data: dict[str, Any] = {"name": "new images", "logits": out["logits"], "features": out["features"]}
        if gradients:
            if self._rows_source is not None:  # matrix-free: the exact rows, recomputed
                passes = dataclasses.replace(self._rows_source, images=images)
            else:
                passes = RowPasses.of_array(out["grads"])  # one chunk (_batches' unit)
            data["g_low"], data["phi_sqnorm"] = project_rows(self.params, self._subspace, passes,
                                                             lambda: out["phi_sqnorm"][:, 0])
        if with_images:
            data["images"] = to_tensor_batch(images, self.params.data.mean, self.params.data.std)
        return data

    def score(self, images: Any, rows: list[str] | str | None = None, progress: bool = False) -> dict[str, np.ndarray]:
        """``{row: scores}`` of every row (or of ``rows``), higher = more in-distribution, as in the report."""
        import torch
        from tqdm import tqdm

        selected, fused = self._selected(rows)
        all_rows = [*selected.rows.values(), *selected.members.values()]
        gradients = self._needs_gradients(all_rows)
        with_images = any(row.uses_images for row in all_rows)
        parts: dict[str, list[np.ndarray]] = {}
        with self._turns, torch.inference_mode(False):
            for batch in tqdm(self._batches(images), desc="score", unit="batch", disable=not progress):
                data = self._features(batch, gradients, with_images)
                for label, s in selected.scores(data, self._ctx, fused).items():
                    parts.setdefault(label, []).append(s)
        if not parts:
            raise DataError("no images to score")
        return {label: np.concatenate(parts[label]) for label in self.check_rows(rows)}

    def predict(self, images: Any, row: str) -> np.ndarray:
        """``True`` where ``row`` flags an image as OOD: its score is below the row's saved threshold (95 % of the
        run's id_test score at or above it)."""
        if not isinstance(row, str):
            raise DetectorError(f"predict needs one row's name, got {row!r}: one of {', '.join(self.rows)}")
        return flagged(self.score(images, rows=[row])[row], self.thresholds[row])

