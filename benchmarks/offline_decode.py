"""Offline decode throughput of the engine (no HTTP): one stream, then N concurrent.

    .venv/bin/python benchmarks/offline_decode.py [--dtype float32] [--concurrency 16] [--max-tokens 128]

Greedy, ignore_eos, so every request decodes exactly --max-tokens tokens. Prints
decode tok/s (output tokens / wall time of the whole generate call, prefill included).
"""

from __future__ import annotations

import argparse
import time

from tokenloom import LLM, SamplingParams


def timed_generate(llm: LLM, prompts: list[str], params: SamplingParams) -> float:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs")
    args = parser.parse_args()

    llm = LLM(args.model, dtype=args.dtype, kv_cache_memory=1.0)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate("warm up", SamplingParams(max_tokens=4), use_tqdm=False)
    prompts = [f"Story {i}: once upon a time, in a village by the sea," for i in range(args.concurrency)]
    single = max(timed_generate(llm, prompts[:1], params) for _ in range(args.repeats))
    batched = max(timed_generate(llm, prompts, params) for _ in range(args.repeats))
    print(f"model={args.model} dtype={args.dtype} max_tokens={args.max_tokens}")
    print(f"single stream:      {single:8.1f} tok/s")
    print(f"{args.concurrency:3d} concurrent:     {batched:8.1f} tok/s")


if __name__ == "__main__":
    main()
