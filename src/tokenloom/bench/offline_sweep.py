"""``bench serve``'s load levels run offline: the same prompts, timed the same way, no HTTP.

A concurrency level keeps c requests in one ``LLMEngine`` (each finished one replaced
by the next, as a closed-loop client does); a request's tokens are timed when
``step()`` returns them. The result is a ``ServeResult``, so ``bench report`` puts it
beside a served run of the same workload: what the server adds to each token
(issue 15's measure: TPOT over HTTP within 10% of offline).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from tokenloom.bench.metrics import RequestRecord, summarize_level
from tokenloom.bench.results import LevelResult, ServeResult
from tokenloom.bench.serve import LoadLevel
from tokenloom.bench.sweep import run_config
from tokenloom.bench.workloads import BenchRequest, WorkloadSpec, build_workload
from tokenloom.engine.llm_engine import LLMEngine
from tokenloom.sampling_params import SamplingParams


def run_offline_sweep(engine: LLMEngine, workload: WorkloadSpec, concurrencies: Sequence[int], label: str,
                      num_warmup: int = 1, show_progress: bool = True) -> ServeResult:
    """Each level gets its own ``workload.num_prompts`` prompts (as ``run_sweep`` gives them)."""
    levels = [LoadLevel(concurrency=c) for c in concurrencies]
    total = workload.num_prompts * len(levels) + num_warmup
    requests = build_workload(dataclasses.replace(workload, num_prompts=total), engine.tokenizer)
    _run_level(engine, requests[:num_warmup], 1, "warmup")
    results = []
    for i, level in enumerate(levels):
        start = num_warmup + i * workload.num_prompts
        batch = requests[start:start + workload.num_prompts]
        with tqdm(total=len(batch), desc=f"{level.label} offline", unit="req", disable=not show_progress) as bar:
            records, duration = _run_level(engine, batch, level.concurrency, f"l{i}", on_done=bar.update)
        results.append(LevelResult(level, summarize_level(records, duration), tuple(records)))
    config: dict[str, Any] = {**run_config(None, workload, levels, None, num_warmup, False),
                              "offline": True, "model": str(engine.config.model.model)}
    return ServeResult(label=label, config=config, levels=tuple(results))


def _run_level(engine: LLMEngine, batch: Sequence[BenchRequest], concurrency: int, tag: str,
               on_done=lambda n: None) -> tuple[list[RequestRecord], float]:
    pending = list(enumerate(batch))[::-1]  # popped from the end: prompt 0 first
    running: dict[str, tuple[int, float, list[float], int]] = {}  # id -> (index, start, chunk times, tokens)
    records: list[RequestRecord] = []
    begin = time.perf_counter()
    while pending or running:
        while pending and len(running) < concurrency:
            index, request = pending.pop()
            request_id = f"offline-{tag}-{index}"
            params = SamplingParams(temperature=0.0, max_tokens=request.output_len, ignore_eos=True)
            engine.add_request(request_id, request.completion_prompt(), params)
            running[request_id] = (index, time.perf_counter(), [], 0)
        for out in engine.step():
            now = time.perf_counter()
            index, start, chunks, tokens = running[out.request_id]
            new = len(out.outputs[0].token_ids)
            if new:
                chunks.append(now)
            running[out.request_id] = (index, start, chunks, tokens + new)
            if out.finished:
                del running[out.request_id]
                records.append(RequestRecord(len(out.prompt_token_ids), tokens + new, start, tuple(chunks), now,
                                             prompt_index=index))
                on_done(1)
    return records, time.perf_counter() - begin
