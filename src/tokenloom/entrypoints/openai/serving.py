"""Request <-> engine: what chat and completions share.

An HTTP request becomes one or more engine requests (one per prompt), each a
``(request_id, prompt token ids, SamplingParams)``. Everything that can be
wrong with a request is checked here, before the engine sees it, so that it
is a 400 naming the field and never an error in the middle of a stream.

The queue bound (``--max-queued-requests``) counts requests accepted by the
server that have not produced their first token yet: a ``Ticket`` is held
from admission until the first output (or the end of the request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from tokenloom.engine.client import EngineClient, EngineDeadError
from tokenloom.entrypoints.openai.errors import (
    SERVER_ERROR,
    OpenAIError,
    bad_request,
    engine_unavailable,
    error_body,
    model_not_found,
    queue_full,
)
from tokenloom.entrypoints.openai.metrics import ServerMetrics
from tokenloom.entrypoints.openai.protocol import SamplingFields
from tokenloom.entrypoints.openai.responses import PromptTokensDetails, UsageInfo
from tokenloom.request import RequestOutput, merge_delta
from tokenloom.sampling_params import InvalidParameter, SamplingParams, StructuredOutputsParams
from tokenloom.structured import GrammarCompileError

logger = logging.getLogger("tokenloom.server")


class QueueGate:
    """Bounds the requests that wait for their first token. Event-loop thread only."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.num_queued = 0

    def reserve(self, count: int) -> list[Ticket]:
        if self.limit is not None and self.num_queued + count > self.limit:
            raise queue_full(self.limit)
        self.num_queued += count
        return [Ticket(self) for _ in range(count)]


class Ticket:
    """One queue slot; ``release`` is idempotent."""

    __slots__ = ("_gate",)

    def __init__(self, gate: QueueGate) -> None:
        self._gate: QueueGate | None = gate

    def release(self) -> None:
        if self._gate is not None:
            self._gate.num_queued -= 1
            self._gate = None


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    """A checked prompt and its parameters; ``text`` is None for a token-id prompt."""

    text: str | None
    token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    ticket: Ticket


class OpenAIServing:
    """Validation, admission, metrics and logging around ``EngineClient.generate``."""

    def __init__(self, engine: EngineClient, model_name: str, gate: QueueGate, metrics: ServerMetrics,
                 log_prompts: bool = False) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.gate = gate
        self.metrics = metrics
        self.log_prompts = log_prompts
        self.vocab_size = engine.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # -- checks --------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise model_not_found(model)

    def check_available(self) -> None:
        if not self.engine.is_alive:
            raise engine_unavailable("the engine loop is not running")

    def check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise bad_request("prompt", "The prompt must contain at least one token.")
        self.check_token_ids(token_ids, "prompt")
        if len(token_ids) >= self.max_model_len:
            raise bad_request("prompt", f"This model's maximum context length is {self.max_model_len} tokens, "
                                        f"but the prompt has {len(token_ids)} tokens, which leaves no room "
                                        "for output.")

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise bad_request(param, f"Token id {bad} is out of vocabulary (size {self.vocab_size}).")

    def resolve_max_tokens(self, requested: int | None, num_prompt_tokens: int) -> int:
        """What remains of the context by default; a request for more is a 400."""
        room = self.max_model_len - num_prompt_tokens
        if requested is None:
            return room
        if requested > room:
            raise bad_request("max_tokens", f"max_tokens is {requested}, but this model's maximum context "
                                            f"length is {self.max_model_len} tokens and the prompt uses "
                                            f"{num_prompt_tokens} of them, leaving {room}.")
        return requested

    def structured_outputs(self, req: SamplingFields) -> tuple[StructuredOutputsParams, str] | None:
        """The request's output constraint and the field it came from (None: unconstrained)."""
        if req.structured_outputs is not None:
            so = req.structured_outputs
            spec = StructuredOutputsParams(json=so.json_, regex=so.regex, choice=so.choice,
                                           grammar=so.grammar, json_object=so.json_object)
            field = "structured_outputs"
        elif req.response_format is not None and req.response_format.type != "text":
            field = "response_format"
            if req.response_format.type == "json_object":
                spec = StructuredOutputsParams(json_object=True)
            elif req.response_format.json_schema.schema_ is None:
                raise bad_request(field, "response_format.json_schema.schema is required")
            else:
                spec = StructuredOutputsParams(json=req.response_format.json_schema.schema_)
        else:
            return None
        spec.validate(field)
        return spec, field

    async def compile_grammar(self, spec: StructuredOutputsParams, field: str) -> None:
        """Wait for the grammar on the compile pool (the engine then finds it cached);
        a grammar that does not compile is a 400 naming ``field``."""
        try:
            await asyncio.wrap_future(self.engine.structured.compile(spec))
        except GrammarCompileError as exc:
            raise bad_request(field, f"{field} cannot be used to constrain the output: {exc.reason}") from None

    def sampling_params(self, req: SamplingFields, max_tokens: int, logprobs: int | None,
                        prompt_logprobs: int | None = None,
                        structured: StructuredOutputsParams | None = None) -> SamplingParams:
        params = SamplingParams(
            n=_or(req.n, 1), temperature=_or(req.temperature, 1.0), top_p=_or(req.top_p, 1.0),
            top_k=_or(req.top_k, 0), min_p=_or(req.min_p, 0.0),
            repetition_penalty=_or(req.repetition_penalty, 1.0),
            presence_penalty=_or(req.presence_penalty, 0.0), frequency_penalty=_or(req.frequency_penalty, 0.0),
            logit_bias=_token_bias(req.logit_bias), seed=req.seed, max_tokens=max_tokens,
            min_tokens=_or(req.min_tokens, 0), stop=_as_list(req.stop), stop_token_ids=list(req.stop_token_ids or []),
            include_stop_str_in_output=_or(req.include_stop_str_in_output, False),
            ignore_eos=_or(req.ignore_eos, False), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=_or(req.skip_special_tokens, True), structured_outputs=structured)
        params.validate(self.vocab_size)
        return params

    # -- running -------------------------------------------------------------

    def admit(self, request_id: str, prompts: list[PreparedPrompt], user: str | None) -> list[EngineRequest]:
        """Reserve queue slots (429 when full) and name the engine requests."""
        self.check_available()
        tickets = self.gate.reserve(len(prompts))
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        requests = [EngineRequest(rid, p.token_ids, p.params, ticket) for rid, p, ticket in zip(ids, prompts, tickets)]
        for r, p in zip(requests, prompts):
            logger.info("request %s: %d prompt tokens, n=%d, max_tokens=%d%s%s", r.request_id,
                        len(r.prompt_token_ids), r.params.n, r.params.max_tokens,
                        f", user={user!r}" if user else "",
                        f", prompt={p.text!r}" if self.log_prompts and p.text is not None else "")
        return requests

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """The engine's deltas, with latency metrics and a log line when it ends."""
        arrival = last = time.monotonic()
        num_tokens, finished = 0, False
        stream = self.engine.generate(request.request_id, request.prompt_token_ids, request.params)
        try:
            async with aclosing(stream):  # leaving early closes it, which aborts the request
                async for out in stream:
                    now = time.monotonic()
                    self._observe_delta(request, out, now - arrival, now - last, num_tokens == 0)
                    num_tokens += sum(len(c.token_ids) for c in out.outputs)
                    last, finished = now, out.finished
                    yield out
        except EngineDeadError as exc:
            raise engine_unavailable(str(exc)) from exc
        finally:
            request.ticket.release()
            if not finished:
                self.metrics.request_finished.labels("abort").inc()
            logger.info("request %s %s: %d completion tokens in %.2fs", request.request_id,
                        "finished" if finished else "aborted", num_tokens, time.monotonic() - arrival)

    def _observe_delta(self, request: EngineRequest, out: RequestOutput, since_arrival: float,
                       since_last: float, first: bool) -> None:
        m = self.metrics
        if first:
            request.ticket.release()
            m.time_to_first_token.observe(since_arrival)
        else:
            m.inter_token_latency.observe(since_last)
        for c in out.outputs:
            if c.finish_reason is not None:
                m.request_finished.labels(c.finish_reason).inc()
        if out.finished:
            m.e2e_request_latency.observe(since_arrival)

    async def merge(self, requests: list[EngineRequest]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """The deltas of several engine requests as they come, tagged with the request's index.
        Closing this iterator aborts every request still running."""
        if len(requests) == 1:
            async with aclosing(self.generate(requests[0])) as stream:
                async for out in stream:
                    yield 0, out
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(i, r, queue)) for i, r in enumerate(requests)]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(self, index: int, request: EngineRequest,
                    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]]) -> None:
        try:
            async with aclosing(self.generate(request)) as stream:
                async for out in stream:
                    queue.put_nowait((index, out))
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, None))

    async def collect(self, requests: list[EngineRequest]) -> list[RequestOutput]:
        """Each engine request's whole output (non-streamed answers)."""
        states: list[RequestOutput | None] = [None] * len(requests)
        async with aclosing(self.merge(requests)) as stream:
            async for index, out in stream:
                states[index] = merge_delta(states[index], out)
        return states


def error_event_body(exc: Exception) -> dict:
    """What a stream sends when it fails after its headers went out (the status is 200 by then)."""
    if isinstance(exc, OpenAIError):
        return exc.body()
    if isinstance(exc, ValueError):
        return error_body(str(exc), param=getattr(exc, "field_name", None))
    logger.error("stream failed", exc_info=exc)
    return error_body(f"internal error: {exc!r}", type=SERVER_ERROR)


def usage_info(counts: list[tuple[int, int, int]]) -> UsageInfo:
    """From (prompt tokens, completion tokens, cached prompt tokens) per engine request."""
    prompt = sum(p for p, _, _ in counts)
    completion = sum(c for _, c, _ in counts)
    cached = sum(k for _, _, k in counts)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def _or(value, default):
    return default if value is None else value


def _as_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _token_bias(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    if not logit_bias:
        return None
    try:
        return {int(token): bias for token, bias in logit_bias.items()}
    except ValueError:
        raise InvalidParameter("logit_bias", "keys must be token ids (integers as strings)") from None
