"""Run one model's tensor-parallel ranks for a test: rank 0 in the test's process, the
others as ``python -m tests.helpers.tensor_parallel`` processes, all joined through a
fresh port on 127.0.0.1 (``ProcessTPGroup``, as the engine's ranks are)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import torch

from tests.model.paged import prefill_logits
from tokenloom.model.loader import load_model
from tokenloom.parallel.group import ProcessTPGroup

REPO = Path(__file__).resolve().parents[2]
CHUNKS = [9, 3, 1]  # a prefill, a second chunk, a decode step


def free_init_method() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def rank_logits(path: Path, rank: int, size: int, init_method: str, quantization: str, load_format: str,
                prompt: list[int]) -> torch.Tensor:
    """This rank's view of the prompt's logits, fed in CHUNKS (rank 0: the full logits)."""
    group = ProcessTPGroup(init_method, rank, size, torch.device("cpu"))
    try:
        model, _ = load_model(path, torch.float32, "cpu", quantization, load_format, seed=3, group=group)
        with torch.inference_mode():
            return prefill_logits(model, prompt, block_size=4, chunks=CHUNKS)
    finally:
        group.close()


def tensor_parallel_logits(path: Path, size: int, prompt: list[int], quantization: str = "none",
                           load_format: str = "auto") -> torch.Tensor:
    """The prompt's logits [len(prompt), vocab] from ``size`` ranks."""
    assert sum(CHUNKS) == len(prompt)
    init = free_init_method()
    others = [subprocess.Popen([sys.executable, "-m", "tests.helpers.tensor_parallel", str(path), str(rank),
                                str(size), init, quantization, load_format, ",".join(map(str, prompt))], cwd=REPO)
              for rank in range(1, size)]
    try:
        logits = rank_logits(path, 0, size, init, quantization, load_format, prompt)
    finally:
        codes = [p.wait(timeout=120) for p in others]
    assert codes == [0] * (size - 1), f"a rank failed: exit codes {codes}"
    return logits


if __name__ == "__main__":
    path, rank, size, init, quant, load_format, ids = sys.argv[1:]
    torch.set_num_threads(1)
    rank_logits(Path(path), int(rank), int(size), init, quant, load_format, [int(t) for t in ids.split(",")])
