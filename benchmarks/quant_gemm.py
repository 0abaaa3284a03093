"""The quantized matmul kernels against MKL, on the default model's shapes.

    .venv/bin/python benchmarks/quant_gemm.py

For each projection shape and row count: ``q4_gemm`` (int4 x int8 GEMM tiles)
and MKL's f32 GEMM on the dense weight. Each runs
over 8 distinct random weights in turn, so weights come from memory as in a
model (not from a cache-hot single matrix). The kernels are timed alternately,
best of several repeats, so the machine's drift hits them alike; compare the
ratios. Freed memory stays in the process (``keep_freed_memory``), as in the
engine: without it, large outputs are page-faulted in again on every call.

A second table does the same for the LM head (Q8_0, [576 -> 49152]) on
``q8_gemm`` (int8 x int8 tiles); a third times both kernels on each instruction
set the CPU has (AVX2 and, where present, AVX-512 VNNI). The per-row kernels these tables once also
timed are gone (docs/performance.md keeps their figures).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from tokenloom import kernels
from tokenloom.model.layers.quantization import quantize
from tokenloom.runner.host_allocator import keep_freed_memory

SHAPES = {"qkv [576 -> 960]": (960, 576), "gate_up [576 -> 3072]": (3072, 576), "down [1536 -> 576]": (576, 1536)}
ROWS = (1, 4, 32, 256, 2048)
WEIGHTS = 8


def best_ms(fns: dict, repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) / WEIGHTS * 1e3 for name, t in times.items()}


def main() -> None:
    ops = kernels.ops()
    keep_freed_memory()
    torch.manual_seed(0)
    print("| shape | rows | q4_gemm ms | MKL f32 ms | q4_gemm GFLOP/s | MKL / q4_gemm |")
    print("|---|---|---|---|---|---|")
    for label, (n, k) in SHAPES.items():
        weights = [quantize(torch.randn(n, k) * 0.05, "int4").with_gemm_tiles() for _ in range(WEIGHTS)]
        dense = [w.dequantize() for w in weights]
        for m in ROWS:
            x = torch.randn(m, k)
            fns = {"gemm": lambda: [ops.q4_gemm(x, w.gemm.tiles, w.gemm.scales, w.gemm.mins, n) for w in weights],
                   "mkl": lambda: [F.linear(x, d) for d in dense]}
            t = best_ms(fns, repeats=30 if m <= 32 else 5)
            gflops = 2 * m * n * k / (t["gemm"] * 1e-3) / 1e9
            print(f"| {label} | {m} | {t['gemm']:.3f} | {t['mkl']:.3f} | {gflops:.0f} | {t['mkl'] / t['gemm']:.2f} |")
    lm_head(ops)
    instruction_sets(ops)


def instruction_sets(ops) -> None:
    """The same kernels on each instruction set the CPU has (AVX2, AVX-512 VNNI), alternately;
    includes a 2048 x 2048 weight, the roofline shape of docs/performance.md."""
    isas = ["avx2"] + (["avx512_vnni"] if kernels.gemm_isa("auto") == "avx512_vnni" else [])
    if len(isas) == 1:
        print("\nthis CPU has no AVX-512 VNNI: only the AVX2 path runs")
        return
    print()
    print("| kernel, shape | rows | AVX2 ms | VNNI ms | AVX2 GFLOP/s | VNNI GFLOP/s | VNNI speed-up |")
    print("|---|---|---|---|---|---|---|")
    shapes = {**SHAPES, "2048 -> 2048": (2048, 2048)}
    for kind, op in (("int4", "q4"), ("int8", "q8")):
        for label, (n, k) in shapes.items():
            weights = [quantize(torch.randn(n, k) * 0.05, kind).with_gemm_tiles() for _ in range(WEIGHTS)]
            for m in (1, 32, 256):
                x = torch.randn(m, k)
                fns = {isa: _on_isa(isa, lambda: [w.matmul(x) for w in weights]) for isa in isas}
                t = best_ms(fns, repeats=20 if m <= 32 else 5)
                flops = 2 * m * n * k / 1e9
                print(f"| {op}_gemm {label} | {m} | {t['avx2']:.3f} | {t['avx512_vnni']:.3f} | "
                      f"{flops / (t['avx2'] * 1e-3):.0f} | {flops / (t['avx512_vnni'] * 1e-3):.0f} | "
                      f"{t['avx2'] / t['avx512_vnni']:.2f} |")
    kernels.gemm_isa("auto")


def _on_isa(isa: str, fn):
    def run():
        kernels.gemm_isa(isa)
        return fn()
    return run


def lm_head(ops) -> None:
    n, k = 49152, 576
    head = quantize(torch.randn(n, k) * 0.05, "int8").with_gemm_tiles()
    dense = head.dequantize()
    print()
    print("| LM head [576 -> 49152] rows | q8_gemm ms | MKL f32 ms | q8_gemm GFLOP/s | MKL / q8_gemm |")
    print("|---|---|---|---|---|")
    for m in (1, 4, 32, 256):
        x = torch.randn(m, k)
        # One head of 28 MB is larger than the caches: calling it WEIGHTS times reads it from memory each time.
        fns = {"gemm": lambda: [ops.q8_gemm(x, head.gemm.tiles, head.gemm.scales, n) for _ in range(WEIGHTS)],
               "mkl": lambda: [F.linear(x, dense) for _ in range(WEIGHTS)]}
        t = best_ms(fns, repeats=10)
        print(f"| {m} | {t['gemm']:.2f} | {t['mkl']:.2f} | {2 * m * n * k / (t['gemm'] * 1e-3) / 1e9:.0f} | "
              f"{t['mkl'] / t['gemm']:.2f} |")


if __name__ == "__main__":
    main()
