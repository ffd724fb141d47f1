"""lowgrad as a library: :class:`LowGrad` fits the method on a classifier and scores new images, in Python.

    det = LowGrad(model, data={"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]})
    det.fit(train_images, train_labels, test=(test_images, test_labels))
    det.score_samples(images)   # {row: scores}, higher = more in-distribution
    det.save("detector/"); LowGrad.load("detector/", model=model)

The options are the sections of ``params.yaml`` that decide the method (``data``'s input settings, ``gradient``,
``subspace``, ``scoring``, ``seed``, ``device``), validated by the same option models with the same defaults, so
``LowGrad.from_params("params.yaml", model)`` fits what the pipeline fits. ``fit`` runs the pipeline's steps in
this process, block by block as its stages do (factors, per-sample gradients in ``gradient.chunk_rows`` rows, the
out-of-core PCA, the projection, each row's fit and its threshold at 95 % ID TPR on ``test``), so on the same
model, images and options it gives the pipeline's scores; the sets' rows are held in memory, or stream through
chunked stores in a ``work_dir`` (:mod:`lowgrad.fit_work`). Scoring new images, the lock
around the shared model and the saved format are the saved detector's (:mod:`lowgrad.fitted`,
:mod:`lowgrad.saved_detector`): ``save`` writes the folder ``load`` reads, with the same checks; ``lowgrad.OODDetector``
is this class, and its ``load`` returns a pipeline run's detector as a fitted ``LowGrad``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from lowgrad.config import InputConfig, format_validation_error
from lowgrad.errors import ConfigError, DataError, DetectorError
from lowgrad.estimator_options import EstimatorParams, parse_options

def _as_images(images: Any, labels: Any, what: str, data: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``N x H x W x C`` images and int64 labels (-1: none) from an array or tensor with ``labels``, a torch
    ``Dataset`` / ``DataLoader`` of ``(image, label)`` pairs, or an image folder (labels from its class folders; read
    and resized as ``lowgrad score`` reads one, to the options' ``data``)."""
    from lowgrad.fitted import _as_array, _describe

    if isinstance(images, (str, Path)):
        from lowgrad.data import folder_images, read_images

        if labels is not None:
            raise DataError(f"{what}: an image folder's labels are its class folders: pass labels=None")
        try:
            config = InputConfig.model_validate(data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, "LowGrad options (an image folder is read to them)",
                                                      InputConfig)) from None
        array, _ = read_images(images, config)
        _, folder_labels = folder_images(Path(images))
        return array, (folder_labels if folder_labels is not None else np.full(len(array), -1)).astype(np.int64)
    if isinstance(images, np.ndarray) or hasattr(images, "numpy"):
        array = _as_array(images)
        y = np.full(len(array), -1) if labels is None else np.asarray(labels.numpy() if hasattr(labels, "numpy") else labels)
    elif hasattr(images, "__iter__") or hasattr(images, "__getitem__"):
        if labels is not None:
            raise DataError(f"{what}: a Dataset or DataLoader carries its labels: pass labels=None")
        parts, ys = [], []
        batched = hasattr(images, "batch_size")
        for item in images:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise DataError(f"{what}: each item must be an (image, label) pair, got {_describe(item)}")
            x, y = item
            parts.append(_as_array(x) if batched else _as_array(x)[None])
            ys.append(np.atleast_1d(np.asarray(y.numpy() if hasattr(y, "numpy") else y)))
        if not parts:
            raise DataError(f"{what}: no images")
        array, y = np.concatenate(parts), np.concatenate(ys)
    else:
        raise DataError(f"{what}: images must be an array, a tensor, a Dataset / DataLoader or an image folder, got "
                        f"{_describe(images)}")
    if len(array) == 0:
        raise DataError(f"{what}: no images")
    if array.ndim == 3:
        array = array[..., None]
    if array.dtype != np.uint8 or array.ndim != 4:
        raise DataError(f"{what}: images must be uint8 N x H x W x C (raw 8-bit pixels), got {_describe(images)}")
    if y.shape != (len(array),):
        raise DataError(f"{what}: {len(array)} images but labels of shape {tuple(y.shape)}")
    return np.ascontiguousarray(array), y.astype(np.int64)


class LowGrad:
    """OOD detection from the low-dimensional projection of per-sample gradients (Wu et al., arXiv 2310.17163).

    ``LowGrad(model, **options)``: ``model`` a classifier (``nn.Module``, images -> logits) whose last ``Linear``
    layer is the head; ``options`` the sections of ``params.yaml`` (:class:`EstimatorParams`). Fitted attributes:
    ``rows_`` (the row names), ``thresholds_`` (each row's at 95 % ID TPR on the ``test`` set), ``subspace_``."""

    def __init__(self, model=None, /, **options: Any) -> None:
        self.model, self.options = model, options

    @classmethod
    def from_params(cls, path_or_mapping: str | Path | dict[str, Any], model=None) -> "LowGrad":
        """The estimator of a params file (or mapping, as ``params.yaml``): its method sections; the model from
        ``model.arch`` and ``models/model.pt`` beside the file when not given."""
        from lowgrad.config import read_raw

        raw = read_raw(path_or_mapping) if isinstance(path_or_mapping, (str, Path)) else dict(path_or_mapping)
        options = {k: raw[k] for k in ("seed", "device", "gradient", "subspace", "scoring") if k in raw}
        data = dict(raw.get("data", {}))
        data.pop("datasets", None)
        options["data"] = data
        if "model" in raw:
            options["model"] = {"arch": raw["model"].get("arch"), "num_classes": raw["model"].get("num_classes")}
        if model is None:
            from lowgrad.checkpoints import load_checkpoint
            from lowgrad.models import build_model
            from lowgrad.paths import MODEL

            root = Path(path_or_mapping).parent if isinstance(path_or_mapping, (str, Path)) else Path(".")
            m = options.get("model", {})
            if not m.get("arch"):
                raise ConfigError("LowGrad.from_params: no model given and no model.arch to build one")
            model = load_checkpoint(build_model(m["arch"], m["num_classes"], data.get("channels", 3),
                                                data.get("image_size", 32)), root / MODEL)
        return cls(model, **options)

    # -- fitting ---------------------------------------------------------------------------------------------------

    def _params(self, images: np.ndarray) -> EstimatorParams:
        raw = copy.deepcopy(self.options)
        data = raw.setdefault("data", {})
        data.setdefault("image_size", images.shape[1])
        data.setdefault("channels", images.shape[3])
        params = parse_options(raw)
        size, channels = params.data.image_size, params.data.channels
        if images.shape[1:] != (size, size, channels):
            raise DataError(f"images are {'x'.join(map(str, images.shape[1:]))}, the options say data.image_size = {size}"
                            f", data.channels = {channels}: resize them first (lowgrad.data.read_images)")
        return params

    def _classifier(self, params: EstimatorParams):
        """The caller's model with the pipeline's classifier interface, on a copy (the caller's object is left as
        it is), in eval mode; and the params with ``model.num_classes`` filled in."""
        from lowgrad.fitted import classifier_of

        if self.model is None:
            raise ConfigError("LowGrad needs a model: LowGrad(model, ...) or LowGrad.from_params(path)")
        return classifier_of(self.model, params)

    def fit(self, images: Any, labels: Any = None, *, test: Any = None, work_dir: str | Path | None = None) -> "LowGrad":
        """Fit every configured row on ``images`` (the ID bank: uint8 ``N x H x W x C`` with ``labels``, a
        ``Dataset`` / ``DataLoader`` of ``(image, label)``, or an image folder); ``test``: held-out ID images in the
        same forms (a tuple ``(images, labels)`` for arrays) that set each row's threshold at 95 % ID TPR.
        ``work_dir``: a folder the sets' gradient rows stream through, chunk by chunk (a killed fit resumes there, a
        later fit of the same images, model and route reuses them: :mod:`lowgrad.fit_work`); None holds them in
        memory."""
        import torch

        from lowgrad.data import ImageSet, check_class_labels
        from lowgrad.extract import make_extractor
        from lowgrad.factors import unflatten
        from lowgrad.fit_work import FitWork
        from lowgrad.models import pick_device
        from lowgrad.scoring import check_bank_size, check_calibration_split, stored_set
        from lowgrad.steps import fit_subspace, project_rows

        data = self.options.get("data", {})
        train_images, train_labels = _as_images(images, labels, "fit images", data)
        if (train_labels < 0).any():
            raise DataError("fit images: every ID image needs its class label (the detectors and the PCA use them)")
        if test is None:
            raise DataError("fit needs test=: held-out ID images that set each row's threshold at 95 % ID TPR")
        test_images, test_labels = _as_images(*(test if isinstance(test, tuple) else (test, None)), "test images", data)
        params = self._params(train_images)
        self._params(test_images)
        model, params = self._classifier(params)
        check_class_labels(train_labels, params.model.num_classes, "fit labels")  # before anything is computed
        check_class_labels(test_labels, params.model.num_classes, "test labels", unlabelled_ok=True)
        check_calibration_split(params, train_labels, "fit labels")
        check_bank_size(params, len(train_images))
        model = model.to(pick_device(params.device))
        given = {"id_train": ImageSet(train_images, train_labels), "id_test": ImageSet(test_images, test_labels)}
        with torch.inference_mode(False), FitWork(work_dir, params, model) as work:
            route = work.route
            self.factors_ = work.factors(train_images)
            stored, sets = {}, {}
            for name, image_set in given.items():
                extractor = make_extractor(params, model, image_set, unflatten(self.factors_))
                stored[name] = work.extract(extractor, name, self.factors_)
                sets[name] = stored_set(stored[name], name)
            passes = _row_passes(params, route, model, given["id_train"].images, stored["id_train"], "id_train")
            self.subspace_ = fit_subspace(params, passes, lambda: sets["id_train"]["labels"])
            self.subspace_.sketch_layout_ = getattr(extractor.gradients, "layout", None) if route.is_sketch else None
            for name, image_set in given.items():
                passes = _row_passes(params, route, model, image_set.images, stored[name], name)
                sets[name]["g_low"], sets[name]["phi_sqnorm"] = project_rows(
                    params, self.subspace_, passes, lambda store=stored[name]: store.read("phi_sqnorm")[:, 0])
            self._fit_rows(params, model, sets, {name: s.images for name, s in given.items()})
        self.params_, self.model_ = params, model
        return self

    def _fit_rows(self, params, model, sets, images) -> None:
        from lowgrad.fitted import FittedDetector, scoring_context, scoring_sources
        from lowgrad.data import to_tensor_batch
        from lowgrad.factors import unflatten
        from lowgrad.metrics import tpr_threshold
        from lowgrad.saved_detector import TPR, SavedDetector
        from lowgrad.scoring import run_all

        ctx = scoring_context(params, model, lambda name: to_tensor_batch(images[name], params.data.mean, params.data.std))
        scores, extras, fitted = run_all(params, sets, ctx)
        id_test = {label: per_set["id_test"] for label, per_set in scores.items()}
        self.thresholds_ = {label: tpr_threshold(s, TPR) for label, s in id_test.items()}
        self.rows_ = list(self.thresholds_)
        self.fitted_, self.id_test_scores_ = fitted, id_test
        extractor, rows_source = scoring_sources(params, model, unflatten(self.factors_))
        saved = SavedDetector(params=params, fitted=fitted, thresholds=self.thresholds_, id_test_scores=id_test)
        self._scorer = FittedDetector(None, saved, ctx, extractor, rows_source, self.subspace_)

    # -- scoring ---------------------------------------------------------------------------------------------------

    def _fitted(self):
        if not hasattr(self, "_scorer"):
            raise DetectorError("this LowGrad is not fitted yet: call fit(images, labels, test=...) or LowGrad.load")
        return self._scorer

    def score_samples(self, images: Any, rows: list[str] | str | None = None, progress: bool = False) -> dict[str, np.ndarray]:
        """``{row: scores}`` of every row (or of ``rows``), higher = more in-distribution."""
        return self._fitted().score(images, rows=rows, progress=progress)

    score = score_samples  # the saved detector's name for it (lowgrad score, the monitor); not scikit-learn's
    # score(X, y), a mean over samples: a second positional argument here names rows

    def predict(self, images: Any, row: str) -> np.ndarray:
        """``True`` where ``row`` flags an image as OOD (its score below the row's threshold)."""
        return self._fitted().predict(images, row=row)

    @property
    def rows(self) -> list[str]:
        """Every row this detector scores, in the report's order (forward, gradient, fused)."""
        return self._fitted().rows

    def check_rows(self, rows: list[str] | str | None) -> list[str]:
        """``rows`` (every row when None), each one this detector has (one :class:`DetectorError` line otherwise)."""
        return self._fitted().check_rows(rows)

    @property
    def thresholds(self) -> dict[str, float]:
        """Each row's threshold at 95 % ID TPR (``thresholds_``)."""
        return self._fitted().thresholds

    @property
    def id_test_scores(self) -> dict[str, np.ndarray]:
        """Each row's scores of the held-out ID set: the reference a monitor compares new batches with."""
        return self._fitted().id_test_scores

    @property
    def params(self):
        """The options (a pipeline run's: its whole params) the detector was fitted with."""
        return self._fitted().params

    @property
    def root(self) -> Path | None:
        """The folder the detector was loaded from (None: fitted in this process)."""
        return self._fitted().root

    # -- saving ----------------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write the fitted detector to ``folder`` (created; an existing one is replaced only once the new one is
        complete): the model's weights, the basis, the factors and every row, in the layout
        :meth:`LowGrad.load` and ``OODDetector.load`` read, with the digests they check."""
        from lowgrad.checkpoints import save_state_dict
        from lowgrad.paths import FACTORS, MODEL, SUBSPACE, atomic_dir
        from lowgrad.saved_detector import save_fitted

        self._fitted()
        if not hasattr(self, "model_"):
            raise DetectorError(f"this detector was loaded from {self.root}: copy that folder instead of saving it again")
        with atomic_dir(folder) as staging:
            save_state_dict(self.model_, staging / MODEL)
            self.subspace_.save(staging / SUBSPACE)
            (staging / FACTORS).parent.mkdir(parents=True, exist_ok=True)
            np.savez(staging / FACTORS, **self.factors_)
            save_fitted(self.fitted_, self.params_, self.id_test_scores_, root=staging)
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path, *, model=None, device: str = "cpu") -> "LowGrad":
        """The fitted estimator saved in ``folder`` (:meth:`save`, or a pipeline run's project folder), every digest
        checked first; ``model``: the classifier when the options name no ``model.arch`` (its weights must be the
        saved ones). ``lowgrad.OODDetector.load`` is this method."""
        from lowgrad.fitted import FittedDetector

        det = FittedDetector.load(folder, device=device, model=model)
        out = cls(model)
        out._scorer, out.params_ = det, det.params
        out.thresholds_, out.rows_ = dict(det.thresholds), list(det.thresholds)
        out.id_test_scores_ = dict(det.id_test_scores)
        return out


def _row_passes(params, route, model, images: np.ndarray, stored, name: str):
    """The gradient rows of one set on the route: recomputed (matrix-free) or its extracted ones, chunk by chunk."""
    if route.recomputes_gradients:
        from lowgrad.matrix_free import exact_rows

        return exact_rows(params, model, images, desc=name)
    from lowgrad.subspace import RowPasses

    return RowPasses.of_store(stored)
