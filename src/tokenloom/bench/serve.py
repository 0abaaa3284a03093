"""The load generator: streams requests at an OpenAI-compatible server and records timestamps.

Two load shapes per level:
  concurrency C   C workers, each sends its next request as soon as the last one ends
  request rate R  requests start at Poisson arrivals of mean rate R per second,
                  however many are already in flight

A level sends at most ``num_prompts`` requests and starts none after
``max_seconds``; requests already in flight run to their end. Output tokens
are the server's own count (``usage`` of the stream) when it reports one, and
the streamed text re-encoded with the model's tokenizer otherwise. Each record
carries the index of its prompt in ``requests`` and the streamed text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from tokenloom.bench.metrics import RequestRecord
from tokenloom.bench.workloads import BenchRequest

FORCE_OUTPUT_MODES = ("ignore_eos", "min_tokens", "both", "none")
# A schema whose answers run past any --output-len (at least 64 records), so that a
# constrained run is cut by max_tokens like a free one, and per-token costs compare.
BENCH_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"records": {"type": "array", "minItems": 64, "items": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0}, "name": {"type": "string", "maxLength": 24},
                       "score": {"type": "number"},
                       "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
        "required": ["id", "name", "score", "tags"], "additionalProperties": False}}},
    "required": ["records"], "additionalProperties": False,
}
RESPONSE_FORMATS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "json-object": {"type": "json_object"},
    "json-schema": {"type": "json_schema", "json_schema": {"name": "records", "schema": BENCH_JSON_SCHEMA}},
}
_ERROR_BODY_CHARS = 300


@dataclass(frozen=True, slots=True)
class ServeTarget:
    """Where and how to send requests."""

    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str
    endpoint: str = "completions"  # or "chat"
    api_key: str | None = None
    # How the output length is forced: ``ignore_eos`` (vLLM, llama-server), ``min_tokens``
    # (vLLM), both, or none (servers that refuse both fields; outputs may then end early).
    force_output: str = "ignore_eos"
    temperature: float = 0.0
    stream_usage: bool = True  # ask for stream_options.include_usage
    response_format: str = "none"  # a RESPONSE_FORMATS key: constrain every answer
    extra_body: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 600.0

    @property
    def url(self) -> str:
        path = "chat/completions" if self.endpoint == "chat" else "completions"
        return f"{self.base_url.rstrip('/')}/{path}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def payload(self, request: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": request.output_len,
                                "temperature": self.temperature, "stream": True}
        if self.endpoint == "chat":
            body["messages"] = request.messages()
        else:
            body["prompt"] = request.completion_prompt()
        if self.stream_usage:
            body["stream_options"] = {"include_usage": True}
        if self.force_output in ("ignore_eos", "both"):
            body["ignore_eos"] = True
        if self.force_output in ("min_tokens", "both"):
            body["min_tokens"] = request.output_len
        if RESPONSE_FORMATS[self.response_format] is not None:
            body["response_format"] = RESPONSE_FORMATS[self.response_format]
        body.update(self.extra_body)
        return body


@dataclass(frozen=True, slots=True)
class LoadLevel:
    """One level of a sweep: a fixed concurrency, or a fixed Poisson request rate."""

    concurrency: int | None = None
    request_rate: float | None = None

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.request_rate is None):
            raise ValueError("a load level is either a concurrency or a request rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.request_rate is not None and self.request_rate <= 0:
            raise ValueError(f"request rate must be positive, got {self.request_rate}")

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.concurrency is not None else f"rate={self.request_rate:g}/s"


CountTokens = Callable[[str], int]
SendOne = Callable[[int, BenchRequest], Awaitable[None]]  # (prompt index, request)


async def send_request(client: httpx.AsyncClient, target: ServeTarget, request: BenchRequest,
                       count_tokens: CountTokens) -> RequestRecord:
    """Streams one request; failures become a record with ``error`` set, never an exception."""
    start = time.perf_counter()
    chunk_times: list[float] = []
    pieces: list[str] = []
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", target.url, json=target.payload(request),
                                 headers=target.headers()) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")[:_ERROR_BODY_CHARS]
                return _failed(request, start, f"HTTP {response.status_code}: {body}")
            async for line in response.aiter_lines():
                event = _parse_event(line)
                if event is None:
                    continue
                text = _event_text(event, target.endpoint)
                if text:
                    chunk_times.append(time.perf_counter())
                    pieces.append(text)
                usage = event.get("usage") or usage
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return _failed(request, start, f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if not chunk_times:
        return _failed(request, start, "the stream carried no output text")
    output_len = int(usage["completion_tokens"]) if usage else count_tokens("".join(pieces))
    prompt_len = int(usage.get("prompt_tokens") or request.prompt_len) if usage else request.prompt_len
    return RequestRecord(prompt_len=prompt_len, output_len=output_len, start=start,
                         chunk_times=tuple(chunk_times), end=end, text="".join(pieces))


def _failed(request: BenchRequest, start: float, error: str) -> RequestRecord:
    return RequestRecord(prompt_len=request.prompt_len, output_len=0, start=start, chunk_times=(),
                         end=time.perf_counter(), error=error)


def _parse_event(line: str) -> dict[str, Any] | None:
    """The JSON of one SSE ``data:`` line; None for keep-alives, comments and ``[DONE]``."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if not data or data == "[DONE]":
        return None
    event = json.loads(data)
    if "error" in event:
        raise httpx.HTTPError(f"error event in the stream: {str(event['error'])[:_ERROR_BODY_CHARS]}")
    return event


def _event_text(event: dict[str, Any], endpoint: str) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    if endpoint == "chat":
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def run_level(target: ServeTarget, requests: Sequence[BenchRequest], level: LoadLevel,
                    count_tokens: CountTokens, max_seconds: float | None = None, seed: int = 0,
                    on_done: Callable[[RequestRecord], None] | None = None) -> tuple[list[RequestRecord], float]:
    """Runs one level; returns the records (in completion order) and the wall time it took."""
    records: list[RequestRecord] = []
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    # A fresh connection per request: reusing a kept-alive one races with servers
    # that close idle connections (llama-server), which shows up as spurious errors.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=target.timeout_s, limits=limits) as client:

        async def one(index: int, request: BenchRequest) -> None:
            record = await send_request(client, target, request, count_tokens)
            record = dataclasses.replace(record, prompt_index=index)
            records.append(record)
            if on_done is not None:
                on_done(record)

        started = time.perf_counter()
        if level.concurrency is not None:
            await _run_closed_loop(one, requests, level.concurrency, deadline)
        else:
            await _run_poisson(one, requests, level.request_rate or 0.0, deadline, random.Random(seed))
        return records, time.perf_counter() - started


async def _run_closed_loop(one: SendOne, requests: Sequence[BenchRequest], concurrency: int, deadline: float | None) -> None:
    pending = enumerate(requests)

    async def worker() -> None:
        for index, request in pending:  # the shared iterator hands each request to one worker
            if deadline is not None and time.perf_counter() >= deadline:
                return
            await one(index, request)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))


async def _run_poisson(one: SendOne, requests: Sequence[BenchRequest], rate: float, deadline: float | None,
                       rng: random.Random) -> None:
    tasks = []
    for i, request in enumerate(requests):
        if i:  # the first request goes at once; the gaps between arrivals are exponential
            await asyncio.sleep(rng.expovariate(rate))
        if deadline is not None and time.perf_counter() >= deadline:
            break
        tasks.append(asyncio.create_task(one(i, request)))
    await asyncio.gather(*tasks)
