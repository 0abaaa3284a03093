"""The offline API, in the shape vLLM users know::

    from tokenloom import LLM, SamplingParams
    llm = LLM(model="smollm2-135m", dtype="float32")
    outputs = llm.generate(["Hello, my name is"], SamplingParams(max_tokens=32))
    print(outputs[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from tokenloom.engine.llm_engine import LLMEngine
from tokenloom.engine.tool_prompt import render_conversation
from tokenloom.request import RequestOutput, merge_delta
from tokenloom.sampling_params import SamplingParams

PromptInput = str | list[int] | dict[str, Any]
Conversation = list[dict[str, Any]]


class LLM:
    """Runs a batch of prompts to completion with continuous batching.

    Keyword options are the engine's (see ``build_engine_config``): dtype and device
    ("auto": bfloat16 on CUDA when there is a GPU, else float32 on the CPU), quantization,
    load_format ("dummy": random weights in the model's shape, which may be a shipped
    shape such as "llama-3.1-8b"), max_model_len, block_size, kv_cache_memory,
    num_kv_blocks, gpu_memory_utilization, max_num_batched_tokens, max_num_seqs,
    enable_prefix_caching (on by default), seed, speculative_config (vLLM's dict, e.g.
    ``{"method": "ngram", "num_speculative_tokens": 5}``; off by default),
    tensor_parallel_size (the model split over that many ranks, processes the engine
    starts; with nnodes, node_rank and distributed_init_method across machines),
    enforce_eager and max_cudagraph_batch_size (CUDA graphs of decode steps, on by default on CUDA).
    ``llm.engine.shutdown()`` ends the ranks at once (they also end with the process).
    """

    def __init__(self, model: str = "smollm2-135m", **options: Any) -> None:
        self.engine = LLMEngine.from_options(model, **options)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Prompts: a str, a list of str, or {"prompt_token_ids": [...]} items (or a list
        of those). Returns one RequestOutput per prompt, in order."""
        items = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(items))
        # Validate every prompt before admitting any, so one bad prompt leaves nothing behind.
        prepared = [self.engine.prepare_request(str(next(self._ids)), _prompt_of(item), p)
                    for item, p in zip(items, params)]
        for p in {id(p): p for p in params}.values():  # grammars compile in parallel, each once
            if p.structured_outputs is not None:
                self.engine.structured.compile(p.structured_outputs).result()  # GrammarCompileError
        for request in prepared:
            self.engine.admit(request)
        return self._run([r.request_id for r in prepared], use_tqdm)

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             tools: Sequence[dict[str, Any]] | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts, tool calls and tool turns
        in OpenAI's shape included) or a list of them. ``tools``: OpenAI function tools
        for the prompt (the template's own tool format, or a generic one); the answer is
        text, to be read with a tool parser (``tokenloom.entrypoints.openai.tool_parsers``)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.tokenizer.encode(
            render_conversation(self.tokenizer, list(c), tools, add_generation_prompt))} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm or len(request_ids) < 2)
        try:
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    results[delta.request_id] = merge_delta(results.get(delta.request_id), delta)
                    if delta.finished:
                        bar.update(1)
        except BaseException:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [results[r] for r in request_ids]


def _as_prompt_list(prompts: PromptInput | Sequence[PromptInput]) -> list[PromptInput]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        raise TypeError("pass token ids as {'prompt_token_ids': [...]}")
    return items


def _prompt_of(item: PromptInput) -> str | list[int]:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and "prompt_token_ids" in item:
        return list(item["prompt_token_ids"])
    if isinstance(item, dict) and "prompt" in item:
        return item["prompt"]
    raise TypeError(f"a prompt is a str or {{'prompt_token_ids': [...]}}, got {type(item).__name__}")


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return params
