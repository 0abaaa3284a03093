from __future__ import annotations

import math

from tokenloom import LLM
from tokenloom.bench.throughput import format_throughput, run_throughput


def test_offline_throughput_counts_every_prompt_and_output_token(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint.hf_dir), num_kv_blocks=256, block_size=4)
    result = run_throughput(llm, num_prompts=3, input_len=16, output_len=5, seed=1)
    assert (result.num_prompts, result.prompt_tokens, result.output_tokens) == (3, 48, 15)
    assert result.prefill_tok_per_s > 0 and result.total_tok_per_s > 0
    assert math.isfinite(result.requests_per_s)
    assert "prefill:" in format_throughput(result) and "decode:" in format_throughput(result)
    assert not llm.engine.has_unfinished_requests()
