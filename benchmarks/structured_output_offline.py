"""What structured output costs per token, offline (no HTTP): free vs JSON-schema answers.

    .venv/bin/python benchmarks/structured_output_offline.py [--batch 32] [--rounds 3]

The same --batch prompts (lines of benchmarks/data/coriolanus.txt), greedy,
--max-tokens 128 with ignore_eos, run free and then under the JSON schema of
``bench serve --response-format json-schema`` (64+ records, so answers run to
max_tokens), alternating for --rounds rounds on one engine (the machine drifts;
alternation spreads the drift over both). Printed: output tok/s of each run, the
median per mode and their ratio; then the per-step cost of the two pieces structured
output adds, timed alone at this batch size: filling the bitmask (llguidance) and
applying it in the sampler.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from tokenloom import LLM, SamplingParams, StructuredOutputsParams
from tokenloom.bench.serve import BENCH_JSON_SCHEMA
from tokenloom.sample.metadata import AllowedTokens
from tokenloom.sample.penalties import apply_allowed_tokens

TEXT = Path(__file__).parent / "data" / "coriolanus.txt"


def prompts(n: int) -> list[str]:
    lines = [line.strip() for line in TEXT.read_text().splitlines() if len(line.split()) > 6]
    return [f"Rewrite as a JSON list of records: {' '.join(lines[i * 4:i * 4 + 4])}" for i in range(n)]


def run(llm: LLM, batch: list[str], params: SamplingParams) -> float:
    start = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / (time.perf_counter() - start)


def step_costs(llm: LLM, batch_size: int, repeats: int = 50) -> tuple[float, float, float]:
    """(fill, apply, advance) ms per step for batch_size constrained rows; advance is
    each matcher consuming a token it allows (and rolling it back, to repeat)."""
    manager = llm.engine.structured
    grammars = [manager.sequence_grammar(StructuredOutputsParams(json=BENCH_JSON_SCHEMA)) for _ in range(batch_size)]
    for g in grammars:
        g.compiled.result()
    start = time.perf_counter()
    for _ in range(repeats):
        bitmask = manager.fill_bitmask(grammars)
    fill = (time.perf_counter() - start) / repeats * 1e3
    logits = torch.randn(batch_size, manager.vocab_size)
    start = time.perf_counter()
    for _ in range(repeats):
        apply_allowed_tokens(logits.clone(), AllowedTokens(None, bitmask))
    apply = (time.perf_counter() - start) / repeats * 1e3
    allowed = [int(row.nonzero()[0]) for row in (logits.clone().fill_(0) + bias_of(bitmask)) == 0]
    start = time.perf_counter()
    for _ in range(repeats):
        for g, token in zip(grammars, allowed):
            g.accept(token)
            g.matcher.rollback(1)
    advance = (time.perf_counter() - start) / repeats * 1e3
    return fill, apply, advance


def bias_of(bitmask: torch.Tensor) -> torch.Tensor:
    logits = torch.zeros(bitmask.shape[0], bitmask.shape[1] * 32)
    return apply_allowed_tokens(logits, AllowedTokens(None, bitmask))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    llm = LLM(args.model)
    batch = prompts(args.batch)
    free = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True,
                                 structured_outputs=StructuredOutputsParams(json=BENCH_JSON_SCHEMA))
    run(llm, batch[:2], constrained)  # warm-up: kernels, the llguidance tokenizer view, the compile
    rates: dict[str, list[float]] = {"free": [], "json-schema": []}
    for _ in range(args.rounds):
        for name, params in (("free", free), ("json-schema", constrained)):
            rates[name].append(run(llm, batch, params))
            print(f"{name:12s} {rates[name][-1]:7.1f} output tok/s")
    medians = {name: statistics.median(r) for name, r in rates.items()}
    print(f"median: free {medians['free']:.1f}, json-schema {medians['json-schema']:.1f} tok/s; "
          f"ratio {medians['json-schema'] / medians['free']:.3f}")
    fill, apply, advance = step_costs(llm, args.batch)
    print(f"per step at batch {args.batch}: fill bitmask {fill:.3f} ms, apply in sampler {apply:.3f} ms, "
          f"advance matchers {advance:.3f} ms")


if __name__ == "__main__":
    main()
