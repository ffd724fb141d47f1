"""The pipeline's stages as functions of validated params: each reads its inputs, writes its outputs
atomically and returns nothing. ``stages/<name>.py`` and the Prefect flow call these.

Artifact layout (all paths relative to the project root)::

    data/prepared/<set>.npz            prepare     uint8 images + labels
    models/model.pt, model.json        model       float32 state_dict (trained or imported) + metadata
    artifacts/extract/<set>.zarr       extract     grads / logits / features / labels (chunked zarr)
    artifacts/subspace/subspace.npz    subspace    kernel normaliser + spectrum
    artifacts/subspace/subspace.zarr   subspace    basis V (P x k, chunked)
    artifacts/projected/<set>.npy      project     G_low (N x k)
    artifacts/projected/<set>.sqnorm.npy  project  ||phi||^2 per sample (the whole normalised gradient)
    artifacts/scores.npz               score       every detector's scores per set
    report/metrics.json                score       metrics (DVC metrics)
    report/report.md, report/plots/    report      Markdown report and PNG plots
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lowgrad import __version__, timing
from lowgrad.config import Params
from lowgrad.data import load_dataset, load_image_set, save_image_set
from lowgrad.errors import CheckpointError
from lowgrad.metrics import accuracy, mean_metrics, ood_metrics
from lowgrad.store import ChunkedStore
from lowgrad.subspace import GradientSubspace, RowPasses

if TYPE_CHECKING:  # torch costs seconds to import: stages that do not need it never load it
    import torch

    from lowgrad.detectors import Head
    from lowgrad.extract import Extractor
    from lowgrad.matrix_free import GradientRows
    from lowgrad.models import FeatureClassifier

log = logging.getLogger(__name__)

PREPARED = "data/prepared/{name}.npz"
MODEL = "models/model.pt"
MODEL_INFO = "models/model.json"
FACTORS = "artifacts/sketch/factors.npz"
FACTORS_INFO = "artifacts/sketch/factors.json"
EXTRACTED = "artifacts/extract/{name}.zarr"
SUBSPACE = "artifacts/subspace/subspace.npz"  # basis V beside it: subspace.zarr
PROJECTED = "artifacts/projected/{name}.npy"
PHI_SQNORM = "artifacts/projected/{name}.sqnorm.npy"  # set names hold no '.', so never another set's G_low
SCORES = "artifacts/scores.npz"
METRICS = "report/metrics.json"
REPORT = "report/report.md"
PLOTS = "report/plots"


def sha256(path: str | Path) -> str:
    """Hex digest of a file, or of a directory's sorted (relative path, file digest) pairs."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(file.relative_to(path)).encode())
            h.update(sha256(file).encode())
        return h.hexdigest()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def prepared_size(name: str, root: str | Path = ".") -> int:
    """Number of samples of a prepared set (reads its labels only)."""
    with np.load(Path(root) / PREPARED.format(name=name), allow_pickle=False) as z:
        return int(z["labels"].shape[0])


# -- prepare ------------------------------------------------------------------------------------------------
def prepare(params: Params, name: str) -> None:
    """Load one configured dataset, check its shape, write ``data/prepared/<name>.npz``."""
    image_set = load_dataset(name, params.data, params.seed)
    if name in ("id_train", "id_test"):
        bad = (image_set.labels < 0) | (image_set.labels >= params.model.num_classes)
        if bad.any():
            raise CheckpointError(
                f"dataset '{name}' has labels outside 0..{params.model.num_classes - 1} (model.num_classes)"
            )
    save_image_set(PREPARED.format(name=name), image_set)


# -- model --------------------------------------------------------------------------------------------------
def _fresh_model(params: Params) -> "FeatureClassifier":
    from lowgrad.models import build_model

    return build_model(params.model.arch, params.model.num_classes, params.data.channels)


def _evaluate(model: "FeatureClassifier", params: Params, name: str, device: "torch.device") -> float:
    """Accuracy on a prepared set; non-finite logits (a finite model can still overflow) are an error."""
    import torch

    from lowgrad.data import to_tensor_batch

    test = load_image_set(PREPARED.format(name=name))
    logits = []
    with torch.no_grad():
        for start in range(0, len(test), 256):
            x = to_tensor_batch(test.images[start : start + 256], params.data.mean, params.data.std).to(device)
            logits.append(model(x).cpu().numpy())
    logits = np.concatenate(logits)
    if not np.isfinite(logits).all():
        raise CheckpointError(f"the model gives non-finite logits on '{name}' (first at image "
                              f"{int(np.flatnonzero(~np.isfinite(logits).all(1))[0])}); check model.checkpoint / data.mean, data.std")
    return accuracy(logits, test.labels)


def build_classifier(params: Params) -> None:
    """Import the configured checkpoint, or train ``model.arch`` on ``id_train`` when none is configured."""
    import torch

    from lowgrad.models import check_finite_state, load_checkpoint, pick_device
    from lowgrad.train import train_classifier

    device = pick_device(params.device)
    torch.manual_seed(params.seed)  # before building: the initial weights are part of the run
    model = _fresh_model(params)
    info: dict[str, Any] = {"arch": params.model.arch, "num_classes": params.model.num_classes}
    if params.model.checkpoint:
        load_checkpoint(model, params.model.checkpoint)
        info.update(source=params.model.checkpoint, checkpoint_sha256=sha256(params.model.checkpoint))
        model.to(device).eval()
    else:
        model = train_classifier(model, load_image_set(PREPARED.format(name="id_train")), params, device)
        info.update(source="trained", train=params.train.model_dump())
    check_finite_state(model, params.model.checkpoint or "the trained model")
    info["n_parameters"] = sum(p.numel() for p in model.parameters())
    info["id_test_accuracy"] = _evaluate(model, params, "id_test", device)
    log.info("model %s: %d parameters, ID test accuracy %.2f %%", info["arch"], info["n_parameters"], info["id_test_accuracy"])
    Path(MODEL).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(MODEL + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(MODEL)
    write_json(MODEL_INFO, info)


def load_classifier(params: Params) -> "FeatureClassifier":
    from lowgrad.models import load_checkpoint

    return load_checkpoint(_fresh_model(params), MODEL).eval()


# -- sketch factors -----------------------------------------------------------------------------------------
def fit_factors(params: Params) -> None:
    """NFK Kronecker factors for the sketched route (estimated on a random kernel sample of ``id_train``);
    a marker file on the exact route or with the NTK kernel (which need none)."""
    g = params.gradient
    info: dict[str, Any] = {"sketch": g.sketch}
    arrays: dict[str, np.ndarray] = {}
    if g.sketch != "none" and params.subspace.kernel == "nfk":
        from lowgrad.data import to_tensor_batch
        from lowgrad.gradients import select_parameters
        from lowgrad.models import pick_device

        train = load_image_set(PREPARED.format(name="id_train"))
        rows = np.sort(np.random.default_rng(params.seed).permutation(len(train))[: g.factor_samples])
        device = pick_device(params.device)
        model = load_classifier(params).to(device)
        batches = (
            to_tensor_batch(train.images[rows[i : i + g.batch_size]], params.data.mean, params.data.std).to(device)
            for i in range(0, len(rows), g.batch_size)
        )
        param_names = select_parameters(model, g.params)
        info.update(kernel="nfk", kernel_samples=len(rows))
        if g.sketch == "dense":
            from lowgrad.dense_sketch import fit_dense_nfk

            arrays = {"dense/w": fit_dense_nfk(model, param_names, batches)}
            log.info("exact NFK scale of %d parameters from %d samples", arrays["dense/w"].size, len(rows))
        else:
            from lowgrad.sketch import fit_kronecker_nfk

            factors, errors = fit_kronecker_nfk(model, batches, param_names=param_names)
            arrays = {f"{layer}/{part}": v for layer, parts in factors.items() for part, v in parts.items()}
            info.update(rank_one_relative_error=errors)
            log.info("NFK Kronecker factors from %d samples; rank-1 error per layer: %s", len(rows),
                     {k: round(v, 3) for k, v in errors.items()})
    Path(FACTORS).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(FACTORS).with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(FACTORS)
    write_json(FACTORS_INFO, info)


def load_factors(path: str | Path = FACTORS) -> dict[str, dict[str, np.ndarray]]:
    factors: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as z:
        for key in z.files:
            layer, part = key.rsplit("/", 1)
            factors.setdefault(layer, {})[part] = z[key]
    return factors


# -- extract ------------------------------------------------------------------------------------------------
def build_extractor(params: Params, name: str, root: str | Path = ".") -> "Extractor":
    """The per-set extractor (model, selected parameters, images); ``root`` is the project directory."""
    from lowgrad.extract import Extractor
    from lowgrad.gradients import select_parameters
    from lowgrad.models import load_checkpoint, pick_device

    root = Path(root)
    model = load_checkpoint(_fresh_model(params), root / MODEL).eval()
    g = params.gradient
    param_names = select_parameters(model, g.params)
    sketch = None
    factors = load_factors(root / FACTORS) if g.sketch != "none" and (root / FACTORS).is_file() else {}
    if g.sketch == "kronecker":
        from lowgrad.sketch import KroneckerSketch

        sketch = KroneckerSketch(model.to(pick_device(params.device)), g.sketch_rank, params.seed, factors, param_names)
    elif g.sketch == "dense":
        from lowgrad.dense_sketch import DenseSketch

        scale = factors.get("dense", {}).get("w")
        sketch = DenseSketch(model.to(pick_device(params.device)), param_names, g.sketch_dim, params.seed, scale)
    return Extractor(
        model,
        param_names,
        load_image_set(root / PREPARED.format(name=name)),
        params.data.mean,
        params.data.std,
        batch_size=g.batch_size,
        dtype=g.dtype,
        max_params=g.max_params,
        device=pick_device(params.device),
        sketch=sketch,
        store_gradients=params.subspace.method != "exact_randomized",
    )


def extract(params: Params, name: str) -> None:
    """Per-sample gradients, logits and features of one prepared set into a resumable zarr store, in this
    process or, with ``cluster.scheduler`` set, sharded over a Dask cluster."""
    from lowgrad.extract import fill_chunks, open_store

    extractor = build_extractor(params, name)
    meta = {
        "dataset": name,
        "dataset_sha256": sha256(PREPARED.format(name=name)),
        "model_sha256": sha256(MODEL),
        "normalize": {"mean": params.data.mean, "std": params.data.std},
        "gradients": "exact" if extractor.gradients is not None else "not stored (matrix-free route)",
    }
    if params.gradient.sketch == "kronecker":
        meta.update(
            gradients="kronecker_sketch", sketch_seed=params.seed, sketch_rank=params.gradient.sketch_rank,
            sketch_layers=extractor.gradients.layout, factors_sha256=sha256(FACTORS),
        )
    elif params.gradient.sketch == "dense":
        meta.update(
            gradients="dense_sketch", sketch_seed=params.seed, sketch_layers=extractor.gradients.layout,
            factors_sha256=sha256(FACTORS),
        )
    path = EXTRACTED.format(name=name)
    store = open_store(extractor, path, params.gradient.chunk_rows, meta)
    pending = store.pending()
    log.info("extracting %d samples (%d params each) into %s: %d of %d chunks to go",
             store.n_rows, extractor.n_params, path, len(pending), store.n_chunks)
    if params.cluster.scheduler and pending:
        from lowgrad.scaleout import fill_on_dask

        store.finalize(chunks_by_worker_pid=fill_on_dask(params, name, pending, root=Path.cwd()))
    else:
        fill_chunks(store, extractor, pending, desc=f"extract {name}")
        store.finalize()


def extract_shard(params: Params, name: str, chunks: list[int], root: str) -> tuple[list[int], int]:
    """Fill some chunks of an existing store (runs on a Dask worker; paths resolved under ``root``).
    Returns the chunks and the worker's process id."""
    import os

    from lowgrad.extract import fill_chunks

    store = ChunkedStore.open_for_filling(Path(root) / EXTRACTED.format(name=name))
    fill_chunks(store, build_extractor(params, name, root), chunks, desc=f"extract {name} shard")
    return list(chunks), os.getpid()


# -- subspace / project -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _row_passes(params: Params, store: ChunkedStore) -> Iterator[RowPasses]:
    """Passes over a store's gradient rows: in this process, or reduced over a Dask cluster."""
    if not params.cluster.scheduler:
        yield RowPasses(lambda: store.iter_chunks("grads"), store.n_rows, store.columns["grads"][0])
        return
    from lowgrad.scaleout import DaskRowPasses, dask_client

    with dask_client(params) as client:
        yield DaskRowPasses(client, store, params.cluster.shards or None)


def gradient_rows(params: Params, name: str) -> "GradientRows":
    """The matrix-free route's exact gradient rows of one prepared set (recomputed on every pass)."""
    from lowgrad.gradients import PerSampleGradients, select_parameters
    from lowgrad.matrix_free import GradientRows
    from lowgrad.models import pick_device

    model = load_classifier(params).to(pick_device(params.device))
    gradients = PerSampleGradients(model, select_parameters(model, params.gradient.params))
    images = load_image_set(PREPARED.format(name=name)).images
    return GradientRows(gradients, images, params.data.mean, params.data.std, params.gradient.batch_size, desc=name)


def fit_subspace(params: Params) -> None:
    """Fit the NFK/NTK normaliser and the low-dimensional basis on the kernel set (``id_train``)."""
    s = params.subspace
    if s.method == "exact_randomized":
        from lowgrad.matrix_free import fit_exact_randomized

        rows = gradient_rows(params, "id_train")
        sub = fit_exact_randomized(rows, s.kernel, s.k, s.oversample, s.power_iters, params.seed)
    else:
        store = ChunkedStore.open(EXTRACTED.format(name="id_train"))
        sketched = store.meta.get("gradients") in ("kronecker_sketch", "dense_sketch")
        sub = GradientSubspace(
            kernel="center" if (sketched and s.kernel == "nfk") else s.kernel,  # sketches already carry the NFK scale
            basis=s.basis,
            method=s.method,
            k=s.k,
            oversample=s.oversample,
            power_iters=s.power_iters,
            seed=params.seed,
        )
        labels = store.read("labels")[:, 0]
        with _row_passes(params, store) as passes:
            sub.fit(passes, labels=labels)
    log.info(
        "subspace: %d components explain %.1f %% of the %s kernel's variance",
        sub.components_.shape[1], 100 * sub.explained_variance_ratio_.sum(), sub.kernel,
    )
    sub.save(SUBSPACE)


def project(params: Params, name: str) -> None:
    """``G_low = phi(g) @ V`` and ``||phi||^2`` for every sample of one set, in one pass over its gradients
    (on sketched routes ``phi`` is the sketched row)."""
    if params.subspace.method == "exact_randomized":
        from lowgrad.matrix_free import transform_rows

        g_low, sqnorm = transform_rows(GradientSubspace.load(SUBSPACE, lazy=True), gradient_rows(params, name))
    else:
        store = ChunkedStore.open(EXTRACTED.format(name=name))
        sub = GradientSubspace.load(SUBSPACE)
        with _row_passes(params, store) as passes:
            g_low, sqnorm = sub.transform_blocks_with_sqnorm(passes)
    for template, array in ((PHI_SQNORM, sqnorm.astype(np.float64)), (PROJECTED, g_low.astype(np.float32))):
        path = Path(template.format(name=name))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, array)
        tmp.replace(path)


# -- score --------------------------------------------------------------------------------------------------
def _inputs(name: str) -> dict[str, Any]:
    store = ChunkedStore.open(EXTRACTED.format(name=name))
    return {
        "name": name,
        "logits": store.read("logits"),
        "features": store.read("features"),
        "labels": store.read("labels")[:, 0],
        "g_low": np.load(PROJECTED.format(name=name)),
        "phi_sqnorm": np.load(PHI_SQNORM.format(name=name)),
    }


def forward_head(model: "FeatureClassifier") -> "Head":
    """The classifier's last layer as a :class:`Head` (forward detectors that read logits from features)."""
    from lowgrad.detectors import Head

    as_np = lambda t: t.detach().double().cpu().numpy().copy()  # noqa: E731
    return Head(weight=as_np(model.head.weight), bias=as_np(model.head.bias))


def stage_timings(params: Params) -> dict[str, dict[str, Any]]:
    """Recorded timings of this configuration's stages (files left by stages no longer configured are ignored)."""
    recorded = timing.collect()
    return {stage: recorded[stage] for stage, _, _ in stage_plan(params) if stage in recorded}


def score(params: Params) -> None:
    """Fit every configured detector on the ID bank, score ID test and OOD sets, write metrics."""
    import torch

    from lowgrad.comparison import evaluate
    from lowgrad.data import to_tensor_batch
    from lowgrad.scoring import ScoringContext, check_bank_size, k_sweep, run_all

    check_bank_size(params, prepared_size("id_train"))
    sets = {name: _inputs(name) for name in ["id_train", "id_test", *params.data.ood_names]}
    model = load_classifier(params)
    for p in model.parameters():
        p.requires_grad_(False)

    def load_images(name: str) -> torch.Tensor:
        images = load_image_set(PREPARED.format(name=name)).images
        return to_tensor_batch(images, params.data.mean, params.data.std)

    ctx = ScoringContext(
        forward_head=forward_head(model),
        num_classes=params.model.num_classes,
        model_forward=model,
        load_images=load_images,
        seed=params.seed,
        probe_options=params.scoring.probe.model_dump(),
    )
    with torch.inference_mode(False):
        all_scores, extras = run_all(params, sets, ctx)
    evidence = evaluate(all_scores, params)
    flat = {f"{label}/{s}": v for label, per_set in all_scores.items() for s, v in per_set.items()}
    for label, table in evidence["methods"].items():
        mean = table["mean"]
        log.info("%-36s mean FPR95 %6.2f [%6.2f, %6.2f]  AUROC %6.2f", label, mean["fpr95"], *mean["ci"]["fpr95"], mean["auroc"])
    log.info("bootstrap: %d replicates in %.1f s", params.scoring.bootstrap.replicates, evidence["bootstrap"]["wall_s"])
    sweep: dict[str, dict[str, dict[str, float]]] = {}
    if params.subspace.basis == "pca":
        for k, rows in k_sweep(params, sets, ctx).items():
            sweep[str(k)] = {
                label: mean_metrics({s: ood_metrics(per_set["id_test"], per_set[s]) for s in params.data.ood_names})
                for label, per_set in rows.items()
            }
    elif params.scoring.k_sweep:
        log.info("scoring.k_sweep skipped: the average-gradient basis has one component per class")
    id_acc = accuracy(sets["id_test"]["logits"], sets["id_test"]["labels"])
    Path(SCORES).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(SCORES).with_suffix(".tmp.npz")
    np.savez(tmp, **flat)
    tmp.replace(SCORES)
    write_json(METRICS, {
        "id_accuracy": id_acc, **extras, **evidence, "k_sweep": sweep,
        "samples": {name: len(d["labels"]) for name, d in sets.items()},
        "timings": {**stage_timings(params), "score": timing.snapshot()},
    })


# -- report -------------------------------------------------------------------------------------------------
def report(params: Params) -> None:
    import torch

    from lowgrad.report import write_report

    metrics = json.loads(Path(METRICS).read_text())
    with np.load(SCORES) as z:
        scores = {k: z[k] for k in z.files}
    sub = GradientSubspace.load(SUBSPACE, lazy=True)
    sizes = {}
    for name in params.data.datasets:
        store = ChunkedStore.open(EXTRACTED.format(name=name))
        sizes[name] = store.n_rows
    n_params = ChunkedStore.open(EXTRACTED.format(name="id_train")).meta["n_params"]
    hashes = {p: sha256(p)[:12] for p in [MODEL, SUBSPACE, str(Path(SUBSPACE).with_suffix(".zarr")), METRICS]}
    hashes.update({PREPARED.format(name=n): sha256(PREPARED.format(name=n))[:12] for n in params.data.datasets})
    run = {
        "lowgrad": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": json.loads(Path(MODEL_INFO).read_text()),
        "gradient parameters (P)": n_params,
        "samples per set": sizes,
    }
    write_report(params, metrics, scores, sub.explained_variance_ratio_, run, hashes, REPORT, PLOTS)


def stage_plan(params: Params) -> list[tuple[str, Callable[..., None], tuple[str, ...]]]:
    """This configuration's stages in dependency order as ``(DVC stage name, function, extra args)``: what
    ``dvc repro`` runs, for callers that run the stages in one process (``bench.routes``)."""
    names = list(params.data.datasets)
    return (
        [(f"prepare@{n}", prepare, (n,)) for n in names]
        + [("model", build_classifier, ()), ("factors", fit_factors, ())]
        + [(f"extract@{n}", extract, (n,)) for n in names]
        + [("subspace", fit_subspace, ())]
        + [(f"project@{n}", project, (n,)) for n in names]
        + [("score", score, ()), ("report", report, ())]
    )
