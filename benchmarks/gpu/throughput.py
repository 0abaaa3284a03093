"""tokenloom offline throughput on CUDA for one shape, at several batch sizes, plus
a profile of decode steps (GPU busy share, kernels per step).

    python benchmarks/gpu/throughput.py llama-3.2-1b --batches 1,64,256

One engine per shape (``--load-format dummy``: random weights of the shape, made
on the GPU), ``bench.throughput.run_throughput`` per batch size. Prints one JSON
line per measurement.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tokenloom.bench.throughput import run_throughput
from tokenloom.entrypoints.llm import LLM
from tokenloom.sampling_params import SamplingParams


def profile_decode(llm: LLM, batch: int, input_len: int, steps: int = 16) -> dict:
    """Wall time, GPU kernel time and kernel launches of ``steps`` decode steps at ``batch``."""
    engine = llm.engine
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"profile-{batch}-{i}", [(7 * i + j) % 40000 + 3 for j in range(input_len)], params)
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    engine.step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels) if kernels and hasattr(kernels[0], "device_time") \
        else sum(e.cuda_time for e in kernels)
    while engine.has_unfinished_requests():
        engine.step()
    return {"profile_batch": batch, "step_ms": wall / steps * 1e3, "gpu_busy": gpu_us / 1e6 / wall,
            "kernels_per_step": len(kernels) / steps,
            "top_kernels": prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--profile-batches", default="1,64")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (the before of issue 15)")
    parser.add_argument("--no-async-scheduling", action="store_true", help="plain steps, no overlap")
    args = parser.parse_args()
    start = time.perf_counter()
    llm = LLM(args.shape, load_format="dummy", device=args.device, dtype="bfloat16", max_num_seqs=256,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False,
              enforce_eager=args.enforce_eager, async_scheduling=False if args.no_async_scheduling else None)
    print(json.dumps({"shape": args.shape, "startup_s": time.perf_counter() - start,
                      "enforce_eager": args.enforce_eager,
                      "async_scheduling": llm.engine.config.scheduler.async_scheduling,
                      "backend": llm.engine.runner.model.ops.name,
                      "num_blocks": llm.engine.config.cache.num_blocks}), flush=True)
    for batch in (int(b) for b in args.batches.split(",") if b):
        r = run_throughput(llm, batch, args.input_len, args.output_len)
        print(json.dumps({"shape": args.shape, "batch": batch, "prefill_tok_per_s": r.prefill_tok_per_s,
                          "decode_tok_per_s": r.decode_tok_per_s, "total_tok_per_s": r.total_tok_per_s,
                          "prefill_s": r.prefill_s, "generate_s": r.generate_s}), flush=True)
    for batch in (int(b) for b in args.profile_batches.split(",") if b and args.device == "cuda"):
        row = profile_decode(llm, batch, args.input_len)
        table = row.pop("top_kernels")
        print(json.dumps({"shape": args.shape, **row}), flush=True)
        print(table, flush=True)


if __name__ == "__main__":
    main()
