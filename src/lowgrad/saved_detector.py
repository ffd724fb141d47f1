"""The fitted detector as files: ``artifacts/detector/`` (an output of ``score``, cached and pulled like any other).

- ``arrays.npz``: every fitted row's state (its attributes ending in ``_``, scikit-learn's convention for what
  ``fit`` learns), the linear probes they read, each fusion member's scores on its held-out calibration part, and
  each row's ``id_test`` scores (the reference a monitor compares new batches with);
- ``detector.json``, written last (a half-written artifact has none): the run's params, every row's threshold at
  95 % ID TPR (fused rows too), and the sha256 of every file the rows belong with (the model, the basis ``V`` and its normaliser,
  the sketch factors) and of ``arrays.npz``. :func:`load_fitted` checks them all before trusting anything (TRAK's
  savers: metadata checked on reopen).

Restoring builds each row as ``score`` does (:func:`lowgrad.scoring.unfitted`: options from the saved params, the
head from the model) and sets the saved state: nothing is refitted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lowgrad.config import USER_CODE, USER_MODULE, Params
from lowgrad.detectors import Detector, Head
from lowgrad.errors import DetectorError
from lowgrad.paths import COMPONENTS, DETECTOR, DETECTOR_ARRAYS, DETECTOR_META, FACTORS, MODEL, SUBSPACE, atomic_dir, sha256
from lowgrad.route import Route
from lowgrad.rows import member_detector

FORMAT = 1
TPR = 0.95  # each row's threshold keeps this fraction of id_test at or above it
SAVED_SECTIONS = ("seed", "data", "model", "gradient", "subspace", "scoring")  # what scoring new images needs


def _saved_params(params: Params) -> dict[str, Any]:
    """The params sections a saved detector scores new images with (``score``'s DVC params; the device is the
    loader's choice, training and the cluster play no part)."""
    out = {}
    for section in SAVED_SECTIONS:
        value = getattr(params, section)
        out[section] = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
    return out


# the library code that decides how saved rows score new images (features, gradients on each route, G_low, the
# detectors and fusion): its sha256 is saved, and an artifact written by other code is refused
SCORING_CODE = ("data", "models", "networks", "checkpoints", "route", "gradients", "layer_capture", "kronecker",
                "exact_nfk", "nfk_factors", "countsketch", "countsketch_kernel", "dense_sketch", "extract", "factors",
                "matrix_free", "subspace", "probe", "detectors", "fusion", "scoring", "saved_detector")


def belongs_with(params: Params) -> list[str]:
    """The files a saved detector scores with besides its own: the model (and the project's ``architectures/`` for a
    ``module:`` model), and on the gradient rows' route the basis with its normaliser and the sketch factors."""
    user_code = [USER_CODE] if (params.model.arch or "").startswith(f"{USER_MODULE}:") else []
    return [MODEL, *user_code, SUBSPACE, COMPONENTS, *([FACTORS] if Route.from_params(params).needs_factors else [])]


def code_digests(modules: tuple[str, ...] = SCORING_CODE) -> dict[str, str]:
    """``{module file: sha256}`` of ``modules`` (of :mod:`lowgrad`) as installed here."""
    import importlib.util

    out = {}
    for name in modules:
        origin = Path(importlib.util.find_spec(f"lowgrad.{name}").origin)
        out[f"lowgrad/{origin.name}"] = sha256(origin)
    return out


def _state(det: Detector, where: str) -> dict[str, np.ndarray]:
    state = {}
    for key, value in vars(det).items():
        if key.endswith("_") and not key.startswith("_"):
            array = np.asarray(value)
            if array.dtype == object:
                raise TypeError(f"{where}: fitted attribute {key} is not an array ({type(value).__name__})")
            state[key] = array
    return state


def _head_arrays(head: Head) -> dict[str, np.ndarray]:
    return {f.name: np.asarray(getattr(head, f.name)) for f in dataclasses.fields(head) if getattr(head, f.name) is not None}


def save_fitted(fitted, params: Params, id_test_scores: dict[str, np.ndarray], root: str | Path = ".",
                into: Path | None = None) -> None:
    """Write ``fitted`` (:class:`lowgrad.scoring.FittedRows`) as ``root/artifacts/detector``, replacing the previous
    one only once complete; ``into``: write into this (empty) staging folder instead, which the caller puts in place
    (the score stage commits the detector with the scores and metrics, :func:`lowgrad.paths.atomic_dir`)."""
    if into is None:
        with atomic_dir(Path(root) / DETECTOR) as staging:
            save_fitted(fitted, params, id_test_scores, root, into=staging)
        return
    from lowgrad.metrics import tpr_threshold

    root = Path(root)
    arrays: dict[str, np.ndarray] = {}
    probes: list[Head] = []
    entries: dict[str, dict[str, dict[str, Any]]] = {"rows": {}, "members": {}}
    for part, table in (("rows", fitted.rows), ("members", fitted.members)):
        for label, row in table.items():
            entry: dict[str, Any] = {"probe": None}
            if row.probe is not None:
                index = next((i for i, p in enumerate(probes) if p is row.probe), len(probes))
                if index == len(probes):
                    probes.append(row.probe)
                    arrays.update({f"probe{index}/{k}": v for k, v in _head_arrays(row.probe).items()})
                entry["probe"] = f"probe{index}"
            arrays.update({f"{part}/{label}/{k}": v for k, v in _state(row.detector, label).items()})
            entry["state"] = sorted(_state(row.detector, label))
            if part == "members":
                arrays[f"calibration/{label}"] = np.asarray(fitted.calibration[label], dtype=np.float64)
            entries[part][label] = entry
    arrays.update({f"id_test/{label}": np.asarray(s, dtype=np.float64) for label, s in id_test_scores.items()})
    arrays_file = into / Path(DETECTOR_ARRAYS).name
    np.savez(arrays_file, **arrays)
    (into / Path(DETECTOR_META).name).write_text(json.dumps({
        "format": FORMAT,
        "thresholds": {label: tpr_threshold(s, TPR) for label, s in id_test_scores.items()},  # every row, fused too
        "rows": entries["rows"],
        "fusion_members": entries["members"],
        "belongs_with": {path: sha256(root / path) for path in belongs_with(params)},
        "arrays_sha256": sha256(arrays_file),
        "code_sha256": code_digests(),
        "params": _saved_params(params),
    }, indent=2) + "\n")


def flagged(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Which scores a row flags as OOD: below its threshold (the run's id_test is at or above it 95 % of the time)."""
    return np.asarray(scores) < threshold


@dataclass
class SavedDetector:
    """A reopened ``artifacts/detector``: the run's params, the fitted rows, thresholds and id_test scores."""

    params: Params
    fitted: Any  # lowgrad.scoring.FittedRows
    thresholds: dict[str, float]
    id_test_scores: dict[str, np.ndarray]


def read_meta(root: str | Path = ".") -> dict[str, Any]:
    """``detector.json`` of the run at ``root``, read and its keys checked, nothing hashed (what a monitor checks
    before it knows whether there is anything to score)."""
    root = Path(root)
    meta_path = root / DETECTOR_META
    if not meta_path.is_file():
        raise DetectorError(f"{root}: no saved detector ({DETECTOR_META} is missing); run the pipeline there first "
                            "(`dvc repro score`), or `dvc pull` its artifacts")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DetectorError(f"{meta_path} is not a saved detector's metadata ({err}); rerun `dvc repro score`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DetectorError(f"{meta_path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, expected "
                            f"{FORMAT}; rerun `dvc repro score` with this version of lowgrad")
    missing = [k for k in ("thresholds", "rows", "fusion_members", "belongs_with", "arrays_sha256", "code_sha256",
                           "params") if k not in meta]
    if missing:
        raise DetectorError(f"{meta_path} lacks {', '.join(missing)}: not a complete saved detector; rerun `dvc repro score`")
    return meta


def check_artifact(root: str | Path = ".") -> dict[str, Any]:
    """``detector.json`` of the run at ``root``, after checking that ``arrays.npz``, every file the detector belongs
    with and the scoring code here are the ones it was saved with (one :class:`DetectorError` line otherwise)."""
    root = Path(root)
    meta = read_meta(root)
    changed = [f for f, digest in code_digests().items() if meta["code_sha256"].get(f) != digest]
    if changed:
        raise DetectorError(f"{root / DETECTOR_META} was saved by other lowgrad code ({', '.join(changed)} differ): the rows "
                            "would score new images differently from the run; rerun `dvc repro score` with this code")
    recorded = {DETECTOR_ARRAYS: meta["arrays_sha256"], **meta["belongs_with"]}
    for path, digest in recorded.items():
        if not (root / path).exists():
            raise DetectorError(f"{root / path} is missing: the saved detector scores with it; `dvc pull` or rerun "
                                "`dvc repro`")
        if sha256(root / path) != digest:
            raise DetectorError(f"{root / path} is not the one this detector was fitted with (sha256 differs): it was "
                                "replaced after `score` ran; rerun `dvc repro` so the detector is refitted on it")
    return meta


def load_fitted(root: str | Path, ctx, meta: dict[str, Any], params: Params) -> SavedDetector:
    """Every row of the run at ``root`` restored from its arrays (``meta``: what :func:`check_artifact` returned;
    ``params``: parsed from it; ``ctx``: a :class:`lowgrad.scoring.ScoringContext` with the run's model head and
    input std)."""
    root = Path(root)
    blob = (root / DETECTOR_ARRAYS).read_bytes()  # read once and checked: the arrays are the ones ``meta`` names, even when
    if hashlib.sha256(blob).hexdigest() != meta["arrays_sha256"]:  # a rerun replaced the folder since
        raise DetectorError(f"{root / DETECTOR_ARRAYS} changed while it was read (a rerun of `score` replaced the detector): "
                            "load it again")
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        arrays = {key: z[key] for key in z.files}
    try:
        return _restored(arrays, meta, params, ctx)
    except KeyError as err:  # the digests matched, so this is an artifact written wrongly, not a damaged one
        raise DetectorError(f"{root / DETECTOR_ARRAYS} lacks {err}: not a complete saved detector; rerun `dvc repro score`") from None


def _restored(arrays: dict[str, np.ndarray], meta: dict[str, Any], params: Params, ctx) -> SavedDetector:
    from lowgrad.scoring import FittedRows, unfitted

    probes: dict[str, Head] = {}

    def probe(key: str | None) -> Head | None:
        if key is not None and key not in probes:
            fields = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{key}/")}
            probes[key] = Head(**{k: (float(v) if k == "bn_eps" else v) for k, v in fields.items()})
        return probes.get(key)

    fitted = FittedRows()
    for part, table, entries in (("rows", fitted.rows, meta["rows"]), ("members", fitted.members, meta["fusion_members"])):
        for label, entry in entries.items():
            name, gradient = member_detector(label)
            kwargs = (params.scoring.gradient if gradient else params.scoring.forward)[name]
            row = unfitted(name, kwargs, gradient, ctx, probe(entry["probe"]))
            for key in entry["state"]:
                value = arrays[f"{part}/{label}/{key}"]
                setattr(row.detector, key, value[()] if value.ndim == 0 else value)
            table[label] = row
            if part == "members":
                fitted.calibration[label] = arrays[f"calibration/{label}"]
    return SavedDetector(
        params=params, fitted=fitted,
        thresholds={label: float(t) for label, t in meta["thresholds"].items()},
        id_test_scores={k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("id_test/")},
    )
