"""host_allocator: freed activation-sized blocks stay in the process for the next step."""

from __future__ import annotations

import subprocess
import sys

import pytest

# malloc and free one 24 MiB block (a prefill chunk's activation) in a fresh process,
# then print how many free bytes glibc's heap holds (mallinfo2().fordblks).
_PROGRAM = """
import ctypes, ctypes.util, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"))
if sys.argv[1] == "tuned":
    from tokenloom.runner.host_allocator import keep_freed_memory
    assert keep_freed_memory()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
libc.free(libc.malloc(24 << 20))
print(libc.mallinfo2().fordblks)
"""


def _free_heap_bytes(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _PROGRAM, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def _has_mallinfo2() -> bool:
    import ctypes
    import ctypes.util

    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_mallinfo2(), reason="glibc >= 2.33 only")
def test_a_freed_block_stays_in_the_heap_instead_of_going_back_to_the_kernel():
    # glibc's defaults map a block this size on its own and unmap it when freed: the next
    # step faults every page of it in again. Tuned, it comes from the heap and stays there.
    assert _free_heap_bytes("default") < 24 << 20
    assert _free_heap_bytes("tuned") >= 24 << 20
