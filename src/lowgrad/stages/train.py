"""Stage ``train``: train ``model.arch`` on ``id_train`` into ``models/trained.pt`` when ``model.checkpoint`` names
that file (the default); otherwise write a marker there, so that a configuration with its own checkpoint trains
nothing. Stage ``model`` then imports whichever checkpoint the params name, as a DVC dependency."""

from __future__ import annotations

from lowgrad.config import Params
from lowgrad.data import load_image_set
from lowgrad.paths import PREPARED, TRAINED, write_text


def train(params: Params) -> None:
    """Train (seeded: the initial weights are part of the run; resumed after the last finished epoch when a kill
    interrupted it), refuse a non-finite result, save its state_dict."""
    if not params.model.trains:
        write_text(TRAINED, f"not trained: model.checkpoint is {params.model.checkpoint}\n")
        return
    import torch

    from lowgrad.checkpoints import check_finite_state, save_state_dict
    from lowgrad.models import fresh_model, pick_device
    from lowgrad.train import finish_training, train_classifier

    torch.manual_seed(params.seed)  # before building: the initial weights are part of the run
    model = fresh_model(params)
    model = train_classifier(model, load_image_set(PREPARED.format(name="id_train")), params, pick_device(params.device))
    check_finite_state(model, "the trained model")
    save_state_dict(model, TRAINED)
    finish_training()
