"""Copies between the host and the device that the extraction makes for every batch.

On CUDA the images go up from page-locked memory and every result of a batch comes down into page-locked memory
without blocking, then the stream is waited for once: one synchronisation per batch instead of one per tensor,
at the page-locked copy rate (a copy from pageable memory is staged through a pinned buffer by the driver and
blocks). The results are then copied into ordinary memory and their page-locked blocks freed, so torch's host
caching allocator hands the same blocks to the next batch: page-locked memory stays at one batch's results, not a
chunk's. On the CPU nothing is copied: the arrays are the tensors' own memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` (on the host) on ``device``; on CUDA through page-locked memory, without blocking the host."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def to_host(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Tensors of one device as host arrays; on CUDA each copied into page-locked memory without blocking, one
    wait for the stream, then each copied into ordinary memory (its page-locked block free for the next batch)."""
    if not tensors:
        return []
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError(f"to_host: tensors on several devices ({sorted({str(t.device) for t in tensors})})")
    if device.type != "cuda":
        return [t.detach().cpu().numpy() for t in tensors]
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for host, t in zip(hosts, tensors):
        host.copy_(t.detach(), non_blocking=True)
    torch.cuda.current_stream(device).synchronize()
    return [host.numpy().copy() for host in hosts]
