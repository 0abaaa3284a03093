"""Keep freed host memory in the process for the next step (glibc malloc settings).

Every forward on the CPU allocates its activations afresh: a 2048-token prefill
chunk of the default model makes buffers of up to 25 MB per op, hundreds per
step. With glibc's defaults, blocks that large are often mapped and unmapped
per allocation, or trimmed back to the kernel once freed, so the next step
takes a page fault for every 4 KB it touches and the kernel zeroes each page
again: about 400,000 faults per offline wave of 32 prompts here, and a 2048-row
gate_up projection ran at 156-184 GFLOP/s instead of 222-267 because of its
output's faults (docs/performance.md). PyTorch's CPU tuning guide answers this with
jemalloc or tcmalloc through LD_PRELOAD; a server started as ``tokenloom
serve`` gets the same effect from two ``mallopt`` settings made at start-up,
before the first forward:

- serve blocks up to 32 MiB (glibc's ceiling for this setting) from the heap
  rather than from fresh mappings;
- return freed heap memory to the kernel only past 1 GiB at the top of the
  heap, so a step's activations are reused by the next step.

The cost is that the process keeps the peak of its activations resident (a
few hundred MB at the default chunk size), as a caching allocator would.
Elsewhere than glibc (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc rejects more on 64-bit systems
TRIM_THRESHOLD_BYTES = 1 << 30

_applied: list[bool] = []


def keep_freed_memory() -> bool:
    """Apply the settings above once per process; True where glibc took them."""
    if not _applied:
        _applied.append(_set_mallopt())
    return _applied[0]


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the kernel now (glibc's ``malloc_trim``): after
    loading, where a quantized file's blocks were freed once their GEMM tiles were built
    (a 1B Q4_K_M model: 0.6 GB). True where glibc did it."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError, TypeError):
        logger.debug("host allocator: not glibc (%s), malloc settings left alone", name)
        return None


def _set_mallopt() -> bool:
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                              TRIM_THRESHOLD_BYTES))
    if not ok:
        logger.warning("host allocator: glibc refused the malloc settings; steps may page-fault more")
    return ok
