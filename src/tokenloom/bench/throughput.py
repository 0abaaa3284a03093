"""Offline throughput: prompts straight through ``LLM.generate``, no HTTP.

Prefill and decode are measured apart in two passes over fresh prompts of the
same shape (fresh, so the second pass gets no prefix-cache hits from the first):

  pass 1  ``max_tokens=1``: all time is prefill   -> prefill tok/s = prompt tokens / t1
  pass 2  ``output_len`` tokens, EOS ignored      -> decode tok/s = (output tokens - 1 per
          request) / (t2 - t1), taking pass 2's prefill to cost what pass 1 did
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from tokenloom.bench.workloads import WorkloadSpec, build_workload
from tokenloom.entrypoints.llm import LLM
from tokenloom.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class ThroughputResult:
    num_prompts: int
    input_len: int
    output_len: int
    prefill_s: float  # pass 1
    generate_s: float  # pass 2
    prompt_tokens: int  # per pass
    output_tokens: int  # pass 2
    prefill_tok_per_s: float
    decode_tok_per_s: float  # NaN when pass 2 was not slower than pass 1 (too little decode to see)
    total_tok_per_s: float  # pass 2: (prompt + output tokens) / t2
    requests_per_s: float  # pass 2


def run_throughput(llm: LLM, num_prompts: int, input_len: int, output_len: int, seed: int = 0) -> ThroughputResult:
    spec = WorkloadSpec("random", num_prompts * 2 + 1, input_len, output_len, seed=seed)
    prompts = [{"prompt_token_ids": llm.tokenizer.encode(r.completion_prompt())}
               for r in build_workload(spec, llm.tokenizer)]
    warmup, prefill_set, generate_set = prompts[:1], prompts[1:num_prompts + 1], prompts[num_prompts + 1:]
    greedy = dict(temperature=0.0, ignore_eos=True)
    llm.generate(warmup, SamplingParams(max_tokens=2, **greedy), use_tqdm=False)

    start = time.perf_counter()
    llm.generate(prefill_set, SamplingParams(max_tokens=1, **greedy), use_tqdm=False)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    outputs = llm.generate(generate_set, SamplingParams(max_tokens=output_len, **greedy))
    generate_s = time.perf_counter() - start

    prompt_tokens = sum(len(p["prompt_token_ids"]) for p in generate_set)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    decode_s = generate_s - prefill_s
    decoded = output_tokens - num_prompts  # each request's first token came with its prefill
    return ThroughputResult(
        num_prompts=num_prompts, input_len=input_len, output_len=output_len,
        prefill_s=prefill_s, generate_s=generate_s, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
        prefill_tok_per_s=sum(len(p["prompt_token_ids"]) for p in prefill_set) / prefill_s,
        decode_tok_per_s=decoded / decode_s if decode_s > 0 and decoded > 0 else math.nan,
        total_tok_per_s=(prompt_tokens + output_tokens) / generate_s,
        requests_per_s=num_prompts / generate_s,
    )


def format_throughput(result: ThroughputResult) -> str:
    return (f"{result.num_prompts} prompts x {result.input_len} in / {result.output_len} out\n"
            f"  prefill: {result.prefill_tok_per_s:10.1f} tok/s  ({result.prompt_tokens} tokens in "
            f"{result.prefill_s:.2f} s)\n"
            f"  decode:  {result.decode_tok_per_s:10.1f} tok/s\n"
            f"  total:   {result.total_tok_per_s:10.1f} tok/s, {result.requests_per_s:.2f} req/s "
            f"({result.output_tokens} output tokens in {result.generate_s:.2f} s)")
