"""How fast a decode step reads each weight: every quantized GEMM of a model at one row.

    PYTHONPATH=. .venv/bin/python benchmarks/decode_gemv.py MODEL [--rounds 3]

Loads MODEL as the engine does and multiplies one row by each layer's q/k/v, o,
gate/up and down projection in model order, then by the LM head, as a decode
step at one stream does (the whole model is larger than the cache, so every
weight comes from memory). Prints, per kind of projection, the milliseconds a
step spends on it and the GB/s of weight bytes it reads, then the total.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from benchmarks.gemm_roofline import weight_bytes  # the repo root is on the path: run from it
from tokenloom import LLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = LLM(args.model).engine.runner.model
    linears = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name, proj in (("qkv", attn.qkv_proj), ("o", attn.o_proj), ("gate_up", mlp.gate_up_proj),
                           ("down", mlp.down_proj)):
            if proj.quantized is None:
                raise SystemExit(f"{args.model}: {name} is not quantized; nothing to time")
            linears.append((name, proj.quantized))
    if model.logits_quantized is not None:
        linears.append(("lm_head", model.logits_quantized))
    rows = {weight.shape[1]: torch.randn(1, weight.shape[1]) for _, weight in linears}
    for _ in range(args.rounds):
        seconds: dict[str, float] = defaultdict(float)
        read: dict[str, int] = defaultdict(int)
        for name, weight in linears:
            start = time.perf_counter()
            weight.matmul(rows[weight.shape[1]])
            seconds[name] += time.perf_counter() - start
            read[name] += weight_bytes(weight)
        cells = [f"{name} {seconds[name] * 1e3:.2f} ms {read[name] / seconds[name] / 1e9:.1f} GB/s" for name in seconds]
        total = sum(seconds.values())
        print(" | ".join(cells), f"| all {total * 1e3:.1f} ms {sum(read.values()) / total / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
