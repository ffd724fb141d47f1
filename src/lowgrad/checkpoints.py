"""Checkpoints: weights loaded with ``weights_only=True`` (no code in a checkpoint runs) into a built model, foreign
layouts normalised (a nested ``state_dict``, ``module.`` prefixes, float16: a cast is logged; integer or bool tensors
where the model holds floats are refused), anything else — a pickled module, a directory, an empty or foreign file, a
key or shape mismatch, non-finite weights — one clear error; and weights saved byte-for-byte reproducibly."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowgrad.errors import CheckpointError

log = logging.getLogger(__name__)


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict (name -> tensor) or {{'state_dict': ...}}, found a "
                              f"{type(obj).__name__}; save one with torch.save(model.state_dict(), path)")
    return {key.removeprefix("module."): value for key, value in obj.items()}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _load_error(path: Path, err: Exception) -> CheckpointError:
    """One line for what ``torch.load(weights_only=True)`` refused: a pickled object (the usual case, a whole
    ``nn.Module`` saved with ``torch.save(model)``) names the class it needs and how to save a state_dict instead."""
    text = _ANSI.sub("", str(err))
    needed = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if needed:
        return CheckpointError(
            f"{path}: a pickled Python object (it needs {needed.group(1)}), not a state_dict; lowgrad loads weights "
            "only (weights_only=True, so no code in a checkpoint runs). Save the weights with "
            "torch.save(model.state_dict(), path) and point model.checkpoint at that file")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return CheckpointError(f"{path}: cannot be loaded with weights_only=True ({type(err).__name__}"
                           + (f": {first}" if first else "") + ")")


def _checkpoint_file(path: Path) -> None:
    """Refuse what is not a torch checkpoint file before torch tries: a directory, an empty file, or a file that is
    neither a zip archive (``torch.save``'s format) nor a legacy pickle."""
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; model.checkpoint names the state_dict file itself")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with path.open("rb") as handle:
        head = handle.read(4)
    if not head:
        raise CheckpointError(f"{path}: is an empty file (0 bytes), not a checkpoint; was it written completely?")
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise CheckpointError(f"{path}: not a torch checkpoint (it starts with {head!r}; torch.save writes a zip "
                              "archive starting with b'PK'); save one with torch.save(model.state_dict(), path)")


def _dtypes_match(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Floating tensors become the model's float32 (a float16 / bfloat16 / float64 checkpoint, said once); a
    tensor of another kind where the model holds floats (int64 or bool weights) is refused, never cast."""
    wrong = [k for k in expected if expected[k].is_floating_point() and not state[k].is_floating_point()]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{path}: '{k}' is {state[k].dtype} where the model holds {expected[k].dtype} "
                              f"({len(wrong)} such tensors); a checkpoint's weights must be floating point")
    cast = sorted({str(state[k].dtype) for k in expected
                   if expected[k].is_floating_point() and state[k].dtype != expected[k].dtype})
    if cast:
        log.info("%s: %s tensors loaded as %s", path, "/".join(cast), next(iter(expected.values())).dtype)
    return {k: v.to(expected[k].dtype) if expected[k].is_floating_point() else v for k, v in state.items()}


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights (``weights_only=True``) into ``model``; raise :class:`CheckpointError` on any mismatch."""
    path = Path(path)
    _checkpoint_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt / unsafe files
        raise _load_error(path, err) from None
    state = _state_dict_of(obj, path)
    expected = model.state_dict()
    for key in expected:  # older checkpoints predate BatchNorm's step counter, which inference never reads
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = expected[key]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: key layout does not match {type(model).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    wrong = [k for k in expected if expected[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{path}: shape mismatch for '{k}': checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
            f" ({len(wrong)} tensors differ; check model.arch and model.num_classes)"
        )
    model.load_state_dict(_dtypes_match(state, expected, path))
    return model


def save_state_dict(model: nn.Module, path: str | Path) -> None:
    """The model's float tensors on the CPU, written atomically and byte-for-byte reproducibly: torch names the
    archive inside the file after the file, so it is serialised in memory first and the same weights always give
    the same bytes (and DVC sees an unchanged model as unchanged)."""
    from lowgrad.paths import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(_state_bytes(model))


def _state_bytes(model: nn.Module) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()


def weights_sha256(model: nn.Module) -> str:
    """sha256 of the file :func:`save_state_dict` writes for ``model`` (the same weights, the same digest)."""
    import hashlib

    return hashlib.sha256(_state_bytes(model)).hexdigest()


def check_finite_state(model: nn.Module, source: str) -> None:
    """Refuse a model whose parameters or buffers (BatchNorm running statistics) hold NaN or infinity, naming
    the first such tensor: such a model would only fail much later, at extraction."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{source}: tensor '{name}' holds {bad} non-finite value(s) (NaN/inf); "
                                  "the model is unusable: use another checkpoint or retrain (lower train.lr)")
