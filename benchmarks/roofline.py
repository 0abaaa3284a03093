"""The machine's roofline for issue 5: memory bandwidth, GEMM throughput, and the
bytes / FLOPs one decode step of the default model needs.

    .venv/bin/python benchmarks/roofline.py

Best of several repeats; the machine is shared, so figures drift 5-10%.
"""

from __future__ import annotations

import time

import torch

GB = 1e9
# SmolLM2-135M: 30 layers, hidden 576, ffn 1536, 9 heads / 3 kv heads of 64, vocab 49152 (tied).
LAYERS, HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 30, 576, 1536, 9, 3, 64, 49152


def best_seconds(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def memory_bandwidth() -> float:
    src = torch.empty(256 * 2**20 // 4, dtype=torch.float32).fill_(1.0)  # 256 MiB
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / seconds / GB  # read + write


def gemm_gflops(dtype: torch.dtype, m: int, k: int = HIDDEN, n: int = 2 * FFN) -> float:
    x = torch.randn(m, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype)
    seconds = best_seconds(lambda: torch.nn.functional.linear(x, w), repeats=5)
    return 2 * m * k * n / seconds / GB


def weight_params() -> int:
    per_layer = HIDDEN * (HEADS + 2 * KV_HEADS) * HEAD_DIM + HEADS * HEAD_DIM * HIDDEN + 3 * HIDDEN * FFN
    return LAYERS * per_layer + VOCAB * HIDDEN


def main() -> None:
    torch.manual_seed(0)
    print(f"threads: {torch.get_num_threads()}, CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    print(f"memory bandwidth (copy, read+write): {memory_bandwidth():.1f} GB/s")
    for dtype in (torch.float32, torch.bfloat16):
        row = ", ".join(f"M={m}: {gemm_gflops(dtype, m):.1f}" for m in (1, 16, 32, 256))
        print(f"GEMM {str(dtype).removeprefix('torch.')} [M x 576] @ [576 x 3072] GFLOP/s: {row}")
    params = weight_params()
    print(f"weights: {params / 1e6:.1f} M parameters (embedding tied with the LM head)")
    for name, bytes_per_param in (("float32", 4), ("bfloat16", 2), ("int8 (Q8_0)", 34 / 32),
                                  ("Q4_1", 20 / 32)):
        print(f"  bytes per decode step, {name:12s}: {params * bytes_per_param / 1e6:7.1f} MB")
    for batch in (1, 32):
        print(f"FLOPs per decode step, batch {batch:2d}: {2 * params * batch / 1e9:.2f} GFLOP (matmuls only)")


if __name__ == "__main__":
    main()
