"""transformers on the same card and shape: the peer of benchmarks/gpu/throughput.py.

    python benchmarks/gpu/hf_peer.py benchmarks/shapes/llama-3.2-1b.json --batches 1,64,256

Random bf16 weights of the shape (transformers' own init), prompts of random
token ids. Two modes: eager ``generate()`` on a batch of equal-length prompts
(prefill included in its time), and ``generate_batch`` (continuous batching,
paged attention, CUDA graphs where that version takes them). Tokens per second
count the tokens each mode returned. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig


def _timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


def eager_generate(model, prompts: torch.Tensor, output_len: int) -> dict:
    config = GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                              pad_token_id=0)
    model.generate(prompts[:, :16], generation_config=GenerationConfig(max_new_tokens=2, do_sample=False,
                                                                      pad_token_id=0))  # warm-up
    out, seconds = _timed(lambda: model.generate(prompts, generation_config=config))
    generated = (out.shape[1] - prompts.shape[1]) * out.shape[0]
    return {"mode": "generate (eager)", "seconds": seconds, "output_tokens": generated,
            "output_tok_per_s": generated / seconds}


def batch_generate(model, prompts: torch.Tensor, output_len: int) -> dict:
    config = GenerationConfig(max_new_tokens=output_len, do_sample=False, pad_token_id=0)
    inputs = prompts.tolist()
    model.generate_batch(inputs=inputs[:2], generation_config=config)  # warm-up (graphs, kernels)
    outputs, seconds = _timed(lambda: model.generate_batch(inputs=inputs, generation_config=config))
    generated = sum(len(o.generated_tokens) for o in outputs.values())
    return {"mode": "generate_batch (continuous batching)", "seconds": seconds, "output_tokens": generated,
            "output_tok_per_s": generated / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--eager-batches", default="1,64")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()
    config = AutoConfig.from_pretrained(args.shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    for mode, batches in (("eager", args.eager_batches), ("batch", args.batches)):
        for batch in (int(b) for b in batches.split(",") if b):
            prompts = torch.randint(3, config.vocab_size, (batch, args.input_len), device="cuda")
            try:
                fn = eager_generate if mode == "eager" else batch_generate
                row = fn(model, prompts, args.output_len)
            except Exception as exc:  # noqa: BLE001 - a peer's failure is a result, not a crash
                row = {"mode": mode, "error": f"{type(exc).__name__}: {exc}"[:500]}
            print(json.dumps({"peer": "transformers", "shape": args.shape, "batch": batch, **row}), flush=True)


if __name__ == "__main__":
    main()
