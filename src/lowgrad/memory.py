"""How many images' per-sample gradients a device holds at once (issue 40).

A route that forms the ``B x P`` matrix of a batch's exact gradients (exact, dense, matrix-free) declares how many
bytes per selected parameter and image it holds at the peak (:attr:`lowgrad.route.Route.bytes_per_value`); the batch
it runs is ``gradient.batch_size`` or fewer, so that those bytes stay within a share of the device's memory — the
free memory of a GPU (``torch.cuda.mem_get_info``) when the stage starts; on a CPU the host's whole memory, or a
container's memory limit where lower (fixed figures, so a CPU run's batches do not depend on what else the machine
is doing). Fewer images per batch change nothing but the order of the floating-point work of a batched pass; a batch
of one that does not fit is one ``error:`` line before any work.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from lowgrad.errors import GradientError

log = logging.getLogger(__name__)

SHARE = 0.5  # of the device's memory that one batch's gradient matrices may take (activations, V, buffers: the rest;
# a saved matrix-free detector sizes its batch first, then keeps V resident only within half of what is still free)
GB = 1024**3


CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1


def device_memory(device: torch.device) -> int:
    """Bytes a batch may count on: a GPU's free memory now, or the host's physical memory (a container's limit
    where it sets a lower one)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return min([int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), *_cgroup_limits()])


def _cgroup_limits() -> list[int]:
    limits = []
    for path in CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) means none
            limits.append(int(text))
    return limits


def fitting_batch(batch_size: int, bytes_per_image: int, device: torch.device, what: str) -> int:
    """``batch_size``, or the most images whose ``bytes_per_image`` fit in :data:`SHARE` of the device's memory (a
    warning says so); one image that does not fit is a :class:`GradientError`."""
    if bytes_per_image <= 0:
        return batch_size
    budget = SHARE * device_memory(device)
    fits = int(budget // bytes_per_image)
    if fits < 1:
        raise GradientError(
            f"{what}: one image's per-sample gradients take {bytes_per_image / GB:.1f} GB, more than {SHARE:.0%} of "
            f"the {budget / SHARE / GB:.1f} GB of {torch.device(device)}; select fewer parameters (gradient.params) "
            "or take a route that never forms them whole (gradient.sketch: exact_nfk or kronecker)")
    if fits < batch_size:
        log.warning("%s: a batch of %d images would hold %.1f GB of per-sample gradients, more than %.0f %% of the "
                    "%.1f GB of %s: batches of %d instead", what, batch_size, batch_size * bytes_per_image / GB,
                    100 * SHARE, budget / SHARE / GB, torch.device(device), fits)
        return fits
    return batch_size
