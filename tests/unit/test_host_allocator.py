"""host_allocator: freed activations stay in the process, so the next step does not page-fault."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Allocate and touch two 24 MiB blocks (a prefill chunk's activations), free them,
# a few times; print the minor page faults of one more round.
_PROGRAM = """
import resource, sys, torch
if sys.argv[1] == "tuned":
    from tokenloom.runner.host_allocator import keep_freed_memory
    assert keep_freed_memory()
def step():
    a = torch.ones(6 << 20)  # 24 MiB of float32
    b = torch.ones(6 << 20)
    del a, b
for _ in range(3):  # to a steady state, as an engine reaches after a few steps
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _PROGRAM, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_a_second_step_reuses_the_first_steps_memory():
    pages = 2 * (24 << 20) // 4096
    assert _faults("default") > pages // 2  # glibc's defaults hand the blocks back and fault them in again
    assert _faults("tuned") < pages // 20
