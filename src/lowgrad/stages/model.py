"""Stage ``model``: import the checkpoint that ``model.checkpoint`` names (the ``train`` stage's model by default);
refuse a non-finite model; record its content hash and the ID test accuracy."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from lowgrad.config import Params
from lowgrad.data import load_image_set, to_tensor_batch
from lowgrad.errors import CheckpointError
from lowgrad.metrics import accuracy
from lowgrad.paths import MODEL, MODEL_INFO, PREPARED, sha256, write_json

if TYPE_CHECKING:
    import torch

    from lowgrad.networks import FeatureClassifier

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


def model(params: Params) -> None:
    """Import the configured checkpoint (a DVC dependency of this stage: replaced in place, it reruns the stage)."""
    from lowgrad.checkpoints import check_finite_state, load_checkpoint, save_state_dict
    from lowgrad.models import fresh_model, pick_device

    device = pick_device(params.device)
    checkpoint = params.model.checkpoint
    classifier = load_checkpoint(fresh_model(params), checkpoint).to(device).eval()
    info: dict[str, Any] = {"arch": params.model.arch, "num_classes": params.model.num_classes,
                            "source": "trained" if params.model.trains else checkpoint,
                            "checkpoint": checkpoint, "checkpoint_sha256": sha256(checkpoint)}
    if params.model.trains:
        info["train"] = params.train.model_dump()
    check_finite_state(classifier, checkpoint)
    info["n_parameters"] = sum(p.numel() for p in classifier.parameters())
    info["id_test_accuracy"] = evaluate(classifier, params, "id_test", device)
    log.info("model %s: %d parameters, ID test accuracy %.2f %%", info["arch"], info["n_parameters"], info["id_test_accuracy"])
    save_state_dict(classifier, MODEL)
    write_json(MODEL_INFO, info)
