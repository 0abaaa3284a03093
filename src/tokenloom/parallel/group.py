"""The ranks of one tensor-parallel model and what passes between them, on torch.distributed.

``TPGroup`` is what the layers see: ``all_reduce`` after each row-parallel
projection and the vocab-parallel embedding, ``gather_logits`` for the LM head.
``SINGLE`` (one rank) makes both the identity, so a model on one device pays
nothing. ``ProcessTPGroup`` joins ``size`` processes through a torch.distributed
store (``tcp://HOST:PORT``, or ``env://`` under torchrun) with two process groups::

    compute   gloo (CPU) or NCCL (CUDA): the step's all-reduces and the logits,
              with a timeout after which a silent rank is an error
    control   gloo, never timing out: rank 0's step messages (``broadcast_object``),
              for which an idle server's workers may wait for hours

A rank that dies closes its sockets, so the others' next exchange fails at once
("Connection closed by peer") rather than hanging.

On gloo, ``all_reduce`` is an exchange: each rank sends its tensor to every other
and sums all of them in rank order. Measured on a 2-core VM, that took 0.24 ms for
a [1, 576] tensor against 1.2-1.6 ms for gloo's own allreduce (its ring does more
round trips), and the sum is the same bits on every rank by construction.
"""

from __future__ import annotations

import datetime
import pickle

import torch
import torch.distributed as dist

COMPUTE_TIMEOUT = datetime.timedelta(minutes=5)
CONTROL_TIMEOUT = datetime.timedelta(days=3650)  # workers wait for the next step while the server idles
_REDUCE_TAG, _LOGITS_TAG = 1, 2


class TPGroup:
    """One rank alone: every collective is the identity."""

    rank = 0
    size = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the ranks (the same bits on every rank)."""
        return x

    def gather_logits(self, x: torch.Tensor, widths: tuple[int, ...]) -> torch.Tensor:
        """Each rank's logits columns [n, widths[rank]] -> [n, sum(widths)] on rank 0 (the
        other ranks get their own columns back)."""
        return x

    def broadcast_object(self, obj: object = None) -> object:
        """Rank 0's ``obj`` on every rank (the others pass nothing)."""
        return obj

    def gather_object(self, obj: object) -> list[object] | None:
        """Every rank's ``obj``, in rank order, on rank 0 (None on the others)."""
        return [obj]

    def close(self) -> None:
        pass


SINGLE = TPGroup()


class ProcessTPGroup(TPGroup):
    """``size`` processes joined through ``init_method``; see the module docstring."""

    def __init__(self, init_method: str, rank: int, size: int, device: torch.device,
                 connect_timeout: datetime.timedelta = datetime.timedelta(minutes=5)) -> None:
        store, _, _ = next(dist.rendezvous(init_method, rank=rank, world_size=size, timeout=connect_timeout))
        self.rank, self.size, self.device = rank, size, device
        self._store = store  # the rank-0 process hosts it (tcp://): kept alive with the group
        self._control = dist.ProcessGroupGloo(dist.PrefixStore("tokenloom/control", store), rank, size,
                                              CONTROL_TIMEOUT)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = COMPUTE_TIMEOUT
            self._compute = dist.ProcessGroupNCCL(dist.PrefixStore("tokenloom/compute", store), rank, size,
                                                  options)
        else:
            self._compute = dist.ProcessGroupGloo(dist.PrefixStore("tokenloom/compute", store), rank, size,
                                                  COMPUTE_TIMEOUT)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if self.device.type == "cuda":
            self._compute.allreduce([x]).wait()
            return x
        parts: list[torch.Tensor] = [x] * self.size
        works = []
        for peer in range(self.size):
            if peer != self.rank:
                parts[peer] = torch.empty_like(x)
                works.append(self._compute.send([x], peer, _REDUCE_TAG))
                works.append(self._compute.recv([parts[peer]], peer, _REDUCE_TAG))
        for work in works:
            work.wait()
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total

    def gather_logits(self, x: torch.Tensor, widths: tuple[int, ...]) -> torch.Tensor:
        x = x.contiguous()
        if self.rank != 0:
            self._compute.send([x], 0, _LOGITS_TAG).wait()
            return x
        parts = [x] + [x.new_empty(x.shape[0], w) for w in widths[1:]]
        works = [self._compute.recv([parts[peer]], peer, _LOGITS_TAG) for peer in range(1, self.size)]
        for work in works:
            work.wait()
        return torch.cat(parts, dim=1)

    def broadcast_object(self, obj: object = None) -> object:
        if self.rank == 0:
            data = _pickled(obj)
            length = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            length = torch.zeros(1, dtype=torch.int64)
        self._control.broadcast([length]).wait()
        if self.rank != 0:
            data = torch.empty(int(length.item()), dtype=torch.uint8)
        self._control.broadcast([data]).wait()
        return obj if self.rank == 0 else _unpickled(data)

    def gather_object(self, obj: object) -> list[object] | None:
        if self.rank != 0:
            data = _pickled(obj)
            self._control.send([torch.tensor([data.numel()], dtype=torch.int64)], 0, 0).wait()
            self._control.send([data], 0, 0).wait()
            return None
        objects = [obj]
        for peer in range(1, self.size):
            length = torch.zeros(1, dtype=torch.int64)
            self._control.recv([length], peer, 0).wait()
            data = torch.empty(int(length.item()), dtype=torch.uint8)
            self._control.recv([data], peer, 0).wait()
            objects.append(_unpickled(data))
        return objects

    def close(self) -> None:
        """Drop the process groups (and, on rank 0, the store's server)."""
        for name in ("_compute", "_control", "_store"):
            if hasattr(self, name):
                delattr(self, name)


def _pickled(obj: object) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)


def _unpickled(data: torch.Tensor) -> object:
    return pickle.loads(data.numpy().tobytes())
