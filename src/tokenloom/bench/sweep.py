"""A whole ``bench serve`` run: warm-up, then each load level on fresh prompts."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import platform
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from tokenloom.bench.metrics import summarize_level
from tokenloom.bench.results import LevelResult, ServeResult
from tokenloom.bench.serve import CountTokens, LoadLevel, ServeTarget, run_level
from tokenloom.bench.workloads import BenchRequest, WorkloadSpec, build_workload
from tokenloom.engine.tokenizer import Tokenizer


class BenchError(RuntimeError):
    """The server refused the benchmark's requests (seen during warm-up)."""


def run_sweep(target: ServeTarget, tokenizer: Tokenizer, workload: WorkloadSpec, levels: Sequence[LoadLevel],
              label: str, max_seconds: float | None = None, num_warmup: int = 1,
              show_progress: bool = True, save_texts: bool = False) -> ServeResult:
    """Each level gets its own ``workload.num_prompts`` prompts, so that no level
    profits from a prefix cache the one before it filled. ``save_texts`` keeps every
    request's output text in the result (to compare two runs' answers)."""
    total = workload.num_prompts * len(levels) + num_warmup
    requests = build_workload(dataclasses.replace(workload, num_prompts=total), tokenizer)

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    config = run_config(target, workload, levels, max_seconds, num_warmup, save_texts)
    _warm_up(target, requests[:num_warmup], count_tokens)
    results = []
    for i, level in enumerate(levels):
        start = num_warmup + i * workload.num_prompts
        batch = requests[start:start + workload.num_prompts]
        results.append(_run_one_level(target, batch, level, count_tokens, max_seconds, workload.seed + i,
                                      show_progress, save_texts))
    return ServeResult(label=label, config=config, levels=tuple(results))


def _warm_up(target: ServeTarget, requests: Sequence[BenchRequest], count_tokens: CountTokens) -> None:
    for request in requests:
        records, _ = asyncio.run(run_level(target, [request], LoadLevel(concurrency=1), count_tokens))
        if records[0].error is not None:
            raise BenchError(f"warm-up request to {target.url} failed: {records[0].error}")


def _run_one_level(target: ServeTarget, batch: Sequence[BenchRequest], level: LoadLevel,
                   count_tokens: CountTokens, max_seconds: float | None, seed: int,
                   show_progress: bool, save_texts: bool) -> LevelResult:
    with tqdm(total=len(batch), desc=level.label, unit="req", disable=not show_progress) as bar:
        records, duration = asyncio.run(run_level(target, batch, level, count_tokens, max_seconds, seed,
                                                  on_done=lambda _: bar.update(1)))
    if not save_texts:
        records = [dataclasses.replace(r, text=None) for r in records]
    summary = summarize_level(records, duration)
    if show_progress:
        tqdm.write(f"{level.label}: {summary.request_throughput:.2f} req/s, "
                   f"{summary.output_throughput:.1f} output tok/s, TTFT p50 {summary.ttft_ms.p50:.0f} ms, "
                   f"TPOT mean {summary.tpot_ms.mean:.1f} ms, errors {summary.num_errors}")
    return LevelResult(level=level, summary=summary, records=tuple(records))


def run_config(target: ServeTarget | None, workload: WorkloadSpec, levels: Sequence[LoadLevel],
               max_seconds: float | None, num_warmup: int, save_texts: bool) -> dict[str, Any]:
    """How a run was made, for its result file (``target`` None: offline, no server)."""
    served = {} if target is None else {
        "base_url": target.base_url, "model": target.model, "endpoint": target.endpoint,
        "force_output": target.force_output, "temperature": target.temperature, "extra_body": target.extra_body}
    return {
        **served, "workload": dataclasses.asdict(workload),
        "levels": [level.label for level in levels], "max_seconds": max_seconds, "num_warmup": num_warmup,
        "save_texts": save_texts,
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": _cpu_model(), "cpu_count": os.cpu_count()},
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
