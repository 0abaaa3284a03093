"""Where the time goes in one prefill: each GEMM by weight shape and format, the rest by op.

    .venv/bin/python benchmarks/prefill_profile.py MODEL [--tokens 256]

Runs one prompt of --tokens tokens through the engine (prefix cache off, after
a warm-up prompt) and prints the wall time of each group of quantized GEMMs
(shape and kind, e.g. "[2048 -> 16384] q4_k x16") and of the other native ops,
as shares of the whole prefill.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections import defaultdict

from tokenloom import LLM, SamplingParams
from tokenloom.model.layers.quantization import QuantizedWeight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    llm = LLM(args.model, enable_prefix_caching=False)
    # The per-layer path (the same kernels, issued from Python), so that each GEMM is timed
    # apart; ``decoder_stack`` runs them all in one native call.
    llm.engine.runner.model.model.decode_stack = None
    prompt = {"prompt_token_ids": [100 + i % 1000 for i in range(args.tokens)]}
    llm.generate([prompt], SamplingParams(max_tokens=1))  # warm-up

    gemms: dict[str, list[float]] = defaultdict(list)
    matmul = QuantizedWeight.matmul

    def timed(self: QuantizedWeight, x):
        start = time.perf_counter()
        y = matmul(self, x)
        n, k = self.shape
        gemms[f"[{k} -> {n}] {self.kind}"].append(time.perf_counter() - start)
        return y

    QuantizedWeight.matmul = timed
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    llm.generate([prompt], SamplingParams(max_tokens=1))
    profile.disable()
    total = time.perf_counter() - start
    QuantizedWeight.matmul = matmul

    print(f"prefill of {args.tokens} tokens: {total * 1e3:.0f} ms")
    print("| part | ms | share |\n|---|---|---|")
    for name, times in sorted(gemms.items(), key=lambda item: -sum(item[1])):
        print(f"| GEMM {name} x{len(times)} | {sum(times) * 1e3:.0f} | {sum(times) / total:.0%} |")
    stats = pstats.Stats(profile).stats
    for (_, _, func), (_, _, own, _, _) in sorted(stats.items(), key=lambda item: -item[1][2]):
        if func.startswith("<built-in method torch._ops.tokenloom.") and "quant_gemm" not in func and own > 0.002 * total:
            print(f"| {func.split('.')[-1].rstrip('>')} | {own * 1e3:.0f} | {own / total:.0%} |")


if __name__ == "__main__":
    main()
