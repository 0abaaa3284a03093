"""N-gram speculative decoding offline: where does it pay, by batch size?

    .venv/bin/python benchmarks/spec_decode_offline.py [--batch-sizes 1,2,4,8,16] [--rounds 2]
        [--workload copy|open] [--num-speculative-tokens 5] [--max-tokens 160]

One process, two engines on the default model (fast path): plain, and with n-gram
drafts (``--prompt-lookup-min``..4, ``disable_by_batch_size`` off, so every batch
size speculates). For each batch size B the same ``--num-prompts`` chat requests of
the workload (``bench/text_prompts.py``, greedy) run on both engines in groups of B
submitted together, alternating, ``--rounds`` times; printed: output tok/s of each
(best round, the machine is noisy), their ratio, mean acceptance length, and whether
the texts are identical.
"""

from __future__ import annotations

import argparse
import time

from tokenloom import LLM, SamplingParams
from tokenloom.bench.text_prompts import copy_texts, open_texts


def run(llm: LLM, conversations: list, params: SamplingParams, batch: int = 0) -> tuple[float, list[str], int]:
    start = time.perf_counter()
    batch = batch or len(conversations)
    outputs = [o for i in range(0, len(conversations), batch)
               for o in llm.chat(conversations[i:i + batch], params, use_tqdm=False)]
    seconds = time.perf_counter() - start
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return num_tokens / seconds, [o.outputs[0].text for o in outputs], num_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-sizes", default="1,2,4,8,16")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workload", default="copy", choices=("copy", "open"))
    p.add_argument("--num-speculative-tokens", type=int, default=5)
    p.add_argument("--prompt-lookup-min", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=160)
    args = p.parse_args()
    spec = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens, "prompt_lookup_max": 4,
            "prompt_lookup_min": args.prompt_lookup_min, "disable_by_batch_size": None}
    plain = LLM(args.model, kv_cache_memory=1.0)
    ngram = LLM(args.model, kv_cache_memory=1.0, speculative_config=spec)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    texts = (copy_texts if args.workload == "copy" else open_texts)(args.num_prompts, 0)
    conversations = [[{"role": "user", "content": t}] for t in texts]
    for llm in (plain, ngram):
        run(llm, [[{"role": "user", "content": texts[0]}]], SamplingParams(temperature=0, max_tokens=8))
    print(f"workload {args.workload}, {args.num_prompts} prompts, k={args.num_speculative_tokens}, "
          f"prompt_lookup {args.prompt_lookup_min}..4, max_tokens {args.max_tokens}")
    print("| batch | plain tok/s | ngram tok/s | ratio | mean acceptance length | texts |")
    print("|---|---|---|---|---|---|")
    for batch in map(int, args.batch_sizes.split(",")):
        best = {"plain": 0.0, "ngram": 0.0}
        before = ngram.engine.stats.snapshot()
        for _ in range(args.rounds):
            rate_plain, texts_plain, _ = run(plain, conversations, params, batch)
            rate_ngram, texts_ngram, _ = run(ngram, conversations, params, batch)
            best["plain"], best["ngram"] = max(best["plain"], rate_plain), max(best["ngram"], rate_ngram)
        after = ngram.engine.stats.snapshot()
        drafts = after.spec_decode_drafts_total - before.spec_decode_drafts_total
        accepted = after.spec_decode_accepted_tokens_total - before.spec_decode_accepted_tokens_total
        length = 1 + accepted / drafts if drafts else 1.0
        print(f"| {batch} | {best['plain']:.1f} | {best['ngram']:.1f} | {best['ngram'] / best['plain']:.2f}x | "
              f"{length:.2f} | {'identical' if texts_plain == texts_ngram else 'DIFFER'} |", flush=True)


if __name__ == "__main__":
    main()
