"""Host <-> device copies that never stall the host inside a step.

A step's inputs are Python ints built by the scheduler. ``torch.tensor(values,
device="cuda")`` copies from pageable memory, which blocks the host until the
GPU has taken the data; staged in pinned (page-locked) memory instead, the copy
is queued on the stream and the host goes on building the step. The other way,
a step's results come back in one queued copy into pinned memory and one wait.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence[int] | Sequence[float], dtype: torch.dtype,
              device: torch.device | str) -> torch.Tensor:
    """``values`` as a 1-D tensor on ``device``; on CUDA through pinned memory, not blocking."""
    host = torch.tensor(values, dtype=dtype)
    return host_to_device(host, device)


def host_to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device``; on CUDA staged in pinned memory and copied without blocking.
    (The caching host allocator keeps the pinned block alive until the copy is done.)"""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def to_host(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Device tensors on the host, copied in one batch with a single wait at the end."""
    return HostCopies(tensors).wait()


class HostCopies:
    """Device tensors on their way to the host: the copies are queued on the stream now
    (into pinned memory, not blocking), ``wait()`` blocks until they have landed. Made
    right after a step is queued, it lets the host schedule the next step meanwhile."""

    def __init__(self, tensors: Sequence[torch.Tensor | None]) -> None:
        self._event: torch.cuda.Event | None = None
        if not any(t is not None and t.device.type == "cuda" for t in tensors):
            self._copies = [None if t is None else t.cpu() for t in tensors]
            return
        self._copies = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(
            t, non_blocking=True) for t in tensors]
        self._event = torch.cuda.Event()
        self._event.record()

    def wait(self) -> list[torch.Tensor | None]:
        if self._event is not None:
            self._event.synchronize()
        return self._copies
