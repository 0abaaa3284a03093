"""The Triton kernels compile for an H100/H200 (CUDA 9.0) down to a cubin, here,
without a GPU: Triton ships ptxas. The interpreter runs the kernels' arithmetic;
this catches what only the compiler sees (types, layouts, tl.dot shapes,
loop-carried values)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("compile_for_cuda.py")
ROOT = SCRIPT.parents[2]


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert len(compiled) == 10, result.stdout
