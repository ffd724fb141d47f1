"""Stage ``model``: import the configured checkpoint, or train ``model.arch`` on ``id_train``; refuse a
non-finite model; record the ID test accuracy."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from lowgrad.config import Params
from lowgrad.data import load_image_set, to_tensor_batch
from lowgrad.errors import CheckpointError
from lowgrad.metrics import accuracy
from lowgrad.paths import MODEL, MODEL_INFO, PREPARED, atomic_path, sha256, write_json

if TYPE_CHECKING:
    import torch

    from lowgrad.models import FeatureClassifier

log = logging.getLogger(__name__)


def evaluate(model: "FeatureClassifier", params: Params, name: str, device: "torch.device") -> float:
    """Accuracy on a prepared set; non-finite logits (a finite model can still overflow) are an error."""
    import torch

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

    from lowgrad.models import check_finite_state, fresh_model, load_checkpoint, pick_device
    from lowgrad.train import train_classifier

    device = pick_device(params.device)
    torch.manual_seed(params.seed)  # before building: the initial weights are part of the run
    model = fresh_model(params)
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
    info["id_test_accuracy"] = evaluate(model, params, "id_test", device)
    log.info("model %s: %d parameters, ID test accuracy %.2f %%", info["arch"], info["n_parameters"], info["id_test_accuracy"])
    with atomic_path(MODEL) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    write_json(MODEL_INFO, info)
