"""Prefix caching, offline (no HTTP): many prompts behind one long system prompt.

    .venv/bin/python benchmarks/prefix_cache_offline.py [--model smollm2-135m] [--num-prompts 64]

Every prompt is the same system prompt (--system-tokens, 1024) followed by a
distinct question (--question-tokens, 32), given as token ids so the lengths are
exact; greedy, --max-tokens 16. The same prompts run on a fresh engine with
prefix caching on, then on another with it off. Printed per run: wall time of
the generate call, prompt tokens computed and prefix-cache hits (from
``engine.stats.snapshot()``); then whether both runs gave the same tokens.
"""

from __future__ import annotations

import argparse
import gc
import time

from tokenloom import LLM, SamplingParams

RULES = [
    "Greet the customer by name when it is known and keep a friendly, professional tone.",
    "Orders placed before noon ship the same day; later orders ship the next business day.",
    "Refunds are issued to the original payment method within five to seven business days.",
    "Never reveal another customer's order details, address, phone number or payment data.",
    "Gift cards cannot be exchanged for cash and do not expire for three years after purchase.",
    "International shipping is available to forty countries; customs fees are paid on delivery.",
    "Damaged items must be reported within fourteen days with a photo of the package and item.",
    "Loyalty members earn two points per dollar and can redeem one hundred points for five dollars.",
]


def system_prompt_ids(llm: LLM, num_tokens: int) -> list[int]:
    text, rule = "You are the support assistant of an online store. Follow these rules.\n", 0
    while len(llm.tokenizer.encode(text)) < num_tokens:
        text += f"Rule {rule + 1}: {RULES[rule % len(RULES)]}\n"
        rule += 1
    return llm.tokenizer.encode(text)[:num_tokens]


def question_ids(llm: LLM, index: int, num_tokens: int) -> list[int]:
    text = (f"Question {index}: I ordered item number {1000 + 37 * index} on day {index % 28 + 1}; "
            f"when will it arrive, and can I still change the delivery address to street {index}? "
            "Please also tell me how many loyalty points the order earned and how to redeem them.")
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < num_tokens:
        raise ValueError(f"question {index} has only {len(ids)} tokens")
    return ids[:num_tokens]


def run(args: argparse.Namespace, prefix_caching: bool) -> tuple[list[list[int]], dict[str, float]]:
    llm = LLM(args.model, dtype=args.dtype, enable_prefix_caching=prefix_caching)
    system = system_prompt_ids(llm, args.system_tokens)
    prompts = [{"prompt_token_ids": system + question_ids(llm, i, args.question_tokens)}
               for i in range(args.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate("warm up", SamplingParams(max_tokens=2), use_tqdm=False)
    before = llm.engine.stats.snapshot()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    after = llm.engine.stats.snapshot()
    figures = {
        "wall_s": elapsed,
        "prompt_tokens_computed": after.prompt_tokens_total - before.prompt_tokens_total,
        "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts),
        "cache_queries": after.prefix_cache_queries_total - before.prefix_cache_queries_total,
        "cache_hits": after.prefix_cache_hits_total - before.prefix_cache_hits_total,
        "steps": after.num_steps_total - before.num_steps_total,
        "preemptions": after.num_preemptions_total - before.num_preemptions_total,
        "num_kv_blocks": llm.engine.config.cache.num_blocks,
    }
    tokens = [o.outputs[0].token_ids for o in outputs]
    del llm, outputs
    gc.collect()
    return tokens, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--system-tokens", type=int, default=1024)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    results = {caching: run(args, caching) for caching in (True, False)}
    print(f"model={args.model} dtype={args.dtype} prompts={args.num_prompts} x "
          f"({args.system_tokens} shared + {args.question_tokens}) tokens, max_tokens={args.max_tokens}")
    for caching, (_, f) in results.items():
        hit_rate = f["cache_hits"] / f["cache_queries"] if f["cache_queries"] else 0.0
        print(f"prefix caching {'on ' if caching else 'off'}: {f['wall_s']:7.2f} s wall, "
              f"{f['prompt_tokens_computed']:6d} of {f['prompt_tokens']} prompt tokens computed, "
              f"hit rate {hit_rate:6.1%} ({f['cache_hits']}/{f['cache_queries']}), "
              f"{f['steps']} steps, {f['preemptions']} preemptions, {f['num_kv_blocks']} KV blocks")
    on, off = results[True], results[False]
    print(f"speed-up {off[1]['wall_s'] / on[1]['wall_s']:.2f}x; "
          f"prefill tokens {off[1]['prompt_tokens_computed'] / on[1]['prompt_tokens_computed']:.1f}x fewer; "
          f"same tokens: {sum(a == b for a, b in zip(on[0], off[0]))}/{len(on[0])} prompts")


if __name__ == "__main__":
    main()
