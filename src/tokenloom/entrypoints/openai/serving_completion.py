"""``POST /v1/completions``: one engine request per prompt.

Choices are numbered ``prompt_index * n + sample_index``, as OpenAI does for a
list of prompts. ``echo`` puts the prompt text in front of each choice's text
(in its first chunk when streaming) and, with ``logprobs``, the prompt tokens'
logprobs in front of the completion's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenloom.entrypoints.openai.logprobs import CompletionLogprobsBuilder, join_completion_logprobs
from tokenloom.entrypoints.openai.protocol import CompletionRequest
from tokenloom.entrypoints.openai.responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
)
from tokenloom.entrypoints.openai.serving import (
    EngineRequest,
    OpenAIServing,
    PreparedPrompt,
    error_event_body,
    usage_info,
)
from tokenloom.entrypoints.openai.streaming import DONE_EVENT, SSEResponse, sse_event, until_disconnected
from tokenloom.request import CompletionOutput, PositionLogprobs, RequestOutput
from tokenloom.sampling_params import StructuredOutputsParams


class OpenAIServingCompletion:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        s = self.serving
        s.check_model(req.model)
        structured = s.structured_outputs(req)
        if structured is not None:
            await s.compile_grammar(*structured)
        prompts = [self._prepare(req, p, structured[0] if structured else None) for p in req.prompts()]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        requests = s.admit(request_id, prompts, req.user)
        echo = [(p.text if p.text is not None else s.tokenizer.decode(p.token_ids, skip_special_tokens=False))
                if req.echo else "" for p in prompts]

        def release_all() -> None:
            for r in requests:
                r.ticket.release()

        if req.stream:
            stream = _CompletionStream(self.serving, request_id, req, requests, echo)
            return SSEResponse(stream.events(), on_close=release_all)
        try:
            states = await until_disconnected(raw, s.collect(requests))
        finally:
            release_all()
        return JSONResponse(self._response(request_id, req, requests, states, echo).model_dump())

    def _prepare(self, req: CompletionRequest, prompt: str | list[int],
                 structured: StructuredOutputsParams | None) -> PreparedPrompt:
        s = self.serving
        ids = s.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        s.check_prompt(ids)
        max_tokens = s.resolve_max_tokens(req.max_tokens, len(ids))
        prompt_logprobs = req.logprobs if req.echo else None
        params = s.sampling_params(req, max_tokens, logprobs=req.logprobs, prompt_logprobs=prompt_logprobs,
                                   structured=structured)
        return PreparedPrompt(prompt if isinstance(prompt, str) else None, ids, params)

    def _response(self, request_id: str, req: CompletionRequest, requests: list[EngineRequest],
                  states: list[RequestOutput], echo: list[str]) -> CompletionResponse:
        choices = []
        for i, (request, state) in enumerate(zip(requests, states)):
            n = request.params.n
            for j, c in enumerate(state.outputs):
                logprobs = None
                if req.logprobs is not None:
                    builder = CompletionLogprobsBuilder(req.logprobs, self.serving.tokenizer)
                    parts = [builder.prompt(state.prompt_token_ids, state.prompt_logprobs or [])] if req.echo else []
                    logprobs = join_completion_logprobs(parts + [builder.completion(c.token_ids, c.logprobs)])
                choices.append(CompletionChoice(index=i * n + j, text=echo[i] + c.text, logprobs=logprobs,
                                                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        usage = usage_info([(len(st.prompt_token_ids), sum(len(c.token_ids) for c in st.outputs),
                             st.num_cached_tokens) for st in states])
        return CompletionResponse(id=request_id, model=self.serving.model_name, choices=choices, usage=usage)


class _CompletionStream:
    """The SSE events of one streamed completions request (several prompts interleave)."""

    def __init__(self, serving: OpenAIServing, request_id: str, req: CompletionRequest,
                 requests: list[EngineRequest], echo: list[str]) -> None:
        self.serving = serving
        self.req = req
        self.requests = requests
        self.echo = echo
        self.id = request_id
        self.created = int(time.time())
        self.builders: dict[int, CompletionLogprobsBuilder] = {}
        self.prompt_logprobs: dict[int, list[PositionLogprobs | None]] = {}
        self.completion_tokens = [0] * len(requests)
        self.cached_tokens = [0] * len(requests)

    async def events(self) -> AsyncIterator[str]:
        try:
            async with aclosing(self.serving.merge(self.requests)) as stream:
                async for i, out in stream:
                    choices = self._choices(i, out)
                    if choices:
                        yield self._chunk(choices)
            if self.req.stream_options and self.req.stream_options.include_usage:
                counts = [(len(r.prompt_token_ids), c, k)
                          for r, c, k in zip(self.requests, self.completion_tokens, self.cached_tokens)]
                yield sse_event(CompletionResponse(id=self.id, created=self.created, model=self.serving.model_name,
                                                   choices=[], usage=usage_info(counts)))
        except Exception as exc:  # the status line is gone; the error travels as an event
            yield sse_event(error_event_body(exc))
        yield DONE_EVENT

    def _chunk(self, choices: list[CompletionChoice]) -> str:
        return sse_event(CompletionResponse(id=self.id, created=self.created, model=self.serving.model_name,
                                            choices=choices))

    def _choices(self, i: int, out: RequestOutput) -> list[CompletionChoice]:
        self.completion_tokens[i] += sum(len(c.token_ids) for c in out.outputs)
        self.cached_tokens[i] = out.num_cached_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs[i] = out.prompt_logprobs
        choices = []
        for c in out.outputs:
            index = i * self.requests[i].params.n + c.index
            first = index not in self.builders
            if first:
                self.builders[index] = CompletionLogprobsBuilder(self.req.logprobs or 0, self.serving.tokenizer)
            text = (self.echo[i] if first else "") + c.text
            logprobs = self._logprobs(i, index, c, first)
            if text or c.finish_reason is not None or (logprobs is not None and logprobs.tokens):
                choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        return choices

    def _logprobs(self, i: int, index: int, c: CompletionOutput, first: bool) -> CompletionLogprobs | None:
        if self.req.logprobs is None:
            return None
        builder = self.builders[index]
        parts = []
        if first and self.req.echo:
            # Sample 0 delivers the prompt logprobs with its first token, before any sibling's.
            parts.append(builder.prompt(self.requests[i].prompt_token_ids, self.prompt_logprobs[i]))
        parts.append(builder.completion(c.token_ids, c.logprobs or []))
        return join_completion_logprobs(parts)
