"""``POST /v1/chat/completions``: messages -> chat template -> one engine request.

A stream opens with one ``{"role": "assistant", "content": ""}`` chunk per
choice, then a chunk per delta that carries text, logprobs or a finish
reason, then (with ``stream_options.include_usage``) a usage chunk with no
choices, then ``data: [DONE]``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenloom.engine.chat_template import ChatTemplateError
from tokenloom.entrypoints.openai.errors import bad_request
from tokenloom.entrypoints.openai.logprobs import chat_logprobs
from tokenloom.entrypoints.openai.protocol import ChatCompletionRequest
from tokenloom.entrypoints.openai.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatStreamChoice,
    DeltaMessage,
)
from tokenloom.entrypoints.openai.serving import (
    EngineRequest,
    OpenAIServing,
    PreparedPrompt,
    error_event_body,
    usage_info,
)
from tokenloom.entrypoints.openai.streaming import DONE_EVENT, SSEResponse, sse_event, until_disconnected
from tokenloom.request import CompletionOutput, RequestOutput


class OpenAIServingChat:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        s = self.serving
        s.check_model(req.model)
        try:
            prompt = s.tokenizer.apply_chat_template([m.template_dict() for m in req.messages])
        except ChatTemplateError as exc:
            raise bad_request("messages", str(exc)) from exc
        token_ids = s.tokenizer.encode(prompt)
        s.check_prompt(token_ids)
        max_tokens = s.resolve_max_tokens(req.requested_max_tokens, len(token_ids))
        num_top = req.top_logprobs or 0
        params = s.sampling_params(req, max_tokens, logprobs=num_top if req.logprobs else None)
        [request] = s.admit(f"chatcmpl-{uuid.uuid4().hex}", [PreparedPrompt(prompt, token_ids, params)], req.user)
        if req.stream:
            return SSEResponse(self._stream(req, request, num_top), on_close=request.ticket.release)
        try:
            [state] = await until_disconnected(raw, s.collect([request]))
        finally:
            request.ticket.release()
        return JSONResponse(self._response(req, request, state, num_top).model_dump())

    def _response(self, req: ChatCompletionRequest, request: EngineRequest, state: RequestOutput,
                  num_top: int) -> ChatCompletionResponse:
        choices = [
            ChatChoice(index=i, message=AssistantMessage(content=c.text),
                       logprobs=chat_logprobs(c.token_ids, c.logprobs, num_top, self.serving.tokenizer)
                       if req.logprobs else None,
                       finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for i, c in enumerate(state.outputs)]
        completion_tokens = sum(len(c.token_ids) for c in state.outputs)
        usage = usage_info([(len(state.prompt_token_ids), completion_tokens, state.num_cached_tokens)])
        return ChatCompletionResponse(id=request.request_id, model=self.serving.model_name, choices=choices,
                                      usage=usage)

    async def _stream(self, req: ChatCompletionRequest, request: EngineRequest,
                      num_top: int) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[ChatStreamChoice], **extra) -> str:
            return sse_event(ChatCompletionChunk(id=request.request_id, created=created,
                                                 model=self.serving.model_name, choices=choices, **extra))

        for i in range(request.params.n):
            yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        completion_tokens, cached = 0, 0
        try:
            async with aclosing(self.serving.merge([request])) as stream:
                async for _, out in stream:
                    completion_tokens += sum(len(c.token_ids) for c in out.outputs)
                    cached = out.num_cached_tokens
                    choices = [self._stream_choice(req, c, num_top) for c in out.outputs if _worth_sending(c, req)]
                    if choices:
                        yield chunk(choices)
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage=usage_info([(len(request.prompt_token_ids), completion_tokens, cached)]))
        except Exception as exc:  # the status line is gone; the error travels as an event
            yield sse_event(error_event_body(exc))
        yield DONE_EVENT

    def _stream_choice(self, req: ChatCompletionRequest, c: CompletionOutput, num_top: int) -> ChatStreamChoice:
        logprobs = None
        if req.logprobs and c.logprobs:
            logprobs = chat_logprobs(c.token_ids, c.logprobs, num_top, self.serving.tokenizer)
        return ChatStreamChoice(index=c.index, delta=DeltaMessage(content=c.text), logprobs=logprobs,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason)


def _worth_sending(c: CompletionOutput, req: ChatCompletionRequest) -> bool:
    """Tokens whose text is held back (a stop string may be forming) send nothing, unless
    their logprobs were asked for."""
    return bool(c.text) or c.finish_reason is not None or bool(req.logprobs and c.token_ids)
