"""Perplexity of a model on a text, through the engine (``LLM.generate``).

The method is llama.cpp's ``llama-perplexity``, so the two can be compared on
the same file: the text's tokens are cut into consecutive windows of ``n_ctx``
tokens, each window is one prompt, and only the second half of every window
is scored (each scored token then sees at least ``n_ctx / 2`` tokens of
context)::

    ppl = exp(mean over scored tokens of -log p(token | window before it))

Log-probabilities come from ``prompt_logprobs`` over the raw logits. The
engine feeds each prompt in chunks of ``max_num_batched_tokens``: with 32 or
fewer, every matmul runs the decode-sized (quantized) path, which is how the
weights of ``--quantization`` are measured.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from tokenloom.entrypoints.llm import LLM
from tokenloom.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    perplexity: float
    num_windows: int
    num_scored_tokens: int
    n_ctx: int
    seconds: float


def run_perplexity(llm: LLM, text: str, n_ctx: int = 512) -> PerplexityResult:
    token_ids = llm.tokenizer.encode(text)
    if n_ctx < 2 or len(token_ids) < n_ctx:
        raise ValueError(f"the text has {len(token_ids)} tokens: need at least one window of n_ctx={n_ctx} (>= 2)")
    windows = [token_ids[i:i + n_ctx] for i in range(0, len(token_ids) - n_ctx + 1, n_ctx)]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    nll = [-out.prompt_logprobs[j][window[j]].logprob
           for window, out in zip(windows, outputs) for j in range(n_ctx // 2, n_ctx)]
    return PerplexityResult(math.exp(sum(nll) / len(nll)), len(windows), len(nll), n_ctx, seconds)
