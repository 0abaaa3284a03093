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
from tokenloom.entrypoints.openai.serving_tools import (
    ToolCallStream,
    ToolContext,
    parse_message,
    render_prompt,
    resolve_parser_name,
    tool_context,
)
from tokenloom.entrypoints.openai.streaming import DONE_EVENT, SSEResponse, sse_event, until_disconnected
from tokenloom.request import CompletionOutput, RequestOutput
from tokenloom.sampling_params import StructuredOutputsParams


class OpenAIServingChat:
    def __init__(self, serving: OpenAIServing, tool_call_parser: str = "auto") -> None:
        self.serving = serving
        self.tool_parser_name = resolve_parser_name(tool_call_parser, serving.tokenizer)

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        s = self.serving
        s.check_model(req.model)
        tools = tool_context(req, self.tool_parser_name)
        try:
            prompt = render_prompt(req, s.tokenizer)
        except ChatTemplateError as exc:
            raise bad_request("messages", str(exc)) from exc
        token_ids = s.tokenizer.encode(prompt)
        s.check_prompt(token_ids)
        max_tokens = s.resolve_max_tokens(req.requested_max_tokens, len(token_ids))
        structured = await self._constraint(req, tools)
        num_top = req.top_logprobs or 0
        params = s.sampling_params(req, max_tokens, logprobs=num_top if req.logprobs else None,
                                   structured=structured)
        [request] = s.admit(f"chatcmpl-{uuid.uuid4().hex}", [PreparedPrompt(prompt, token_ids, params)], req.user)
        if tools is not None and not tools.parses_calls:
            tools = None  # tool_choice "none": the tools were in the prompt, the answer is text
        if req.stream:
            return SSEResponse(self._stream(req, request, num_top, tools), on_close=request.ticket.release)
        try:
            [state] = await until_disconnected(raw, s.collect([request]))
        finally:
            request.ticket.release()
        return JSONResponse(self._response(req, request, state, num_top, tools).model_dump())

    async def _constraint(self, req: ChatCompletionRequest,
                          tools: ToolContext | None) -> StructuredOutputsParams | None:
        """The output's grammar: a forced tool call, response_format or structured_outputs."""
        forced = tools.forced_call() if tools is not None else None
        if forced is not None:
            await self.serving.compile_grammar(forced, "tools")
            return forced
        structured = self.serving.structured_outputs(req)
        if structured is None:
            return None
        await self.serving.compile_grammar(*structured)
        return structured[0]

    def _response(self, req: ChatCompletionRequest, request: EngineRequest, state: RequestOutput,
                  num_top: int, tools: ToolContext | None) -> ChatCompletionResponse:
        choices = []
        for i, c in enumerate(state.outputs):
            message, finish_reason = AssistantMessage(content=c.text), c.finish_reason
            if tools is not None:
                message, finish_reason = parse_message(tools, c.text, c.finish_reason)
            logprobs = chat_logprobs(c.token_ids, c.logprobs, num_top, self.serving.tokenizer) if req.logprobs else None
            choices.append(ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=finish_reason,
                                      stop_reason=c.stop_reason))
        completion_tokens = sum(len(c.token_ids) for c in state.outputs)
        usage = usage_info([(len(state.prompt_token_ids), completion_tokens, state.num_cached_tokens)])
        return ChatCompletionResponse(id=request.request_id, model=self.serving.model_name, choices=choices,
                                      usage=usage)

    async def _stream(self, req: ChatCompletionRequest, request: EngineRequest,
                      num_top: int, tools: ToolContext | None) -> AsyncIterator[str]:
        created = int(time.time())
        tool_streams = [ToolCallStream(tools) for _ in range(request.params.n)] if tools is not None else None

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
                    choices = [self._stream_choice(req, c, num_top, tool_streams) for c in out.outputs
                               if _worth_sending(c, req)]
                    choices = [c for c in choices if c is not None]
                    if choices:
                        yield chunk(choices)
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage=usage_info([(len(request.prompt_token_ids), completion_tokens, cached)]))
        except Exception as exc:  # the status line is gone; the error travels as an event
            yield sse_event(error_event_body(exc))
        yield DONE_EVENT

    def _stream_choice(self, req: ChatCompletionRequest, c: CompletionOutput, num_top: int,
                       tool_streams: list[ToolCallStream] | None) -> ChatStreamChoice | None:
        logprobs = None
        if req.logprobs and c.logprobs:
            logprobs = chat_logprobs(c.token_ids, c.logprobs, num_top, self.serving.tokenizer)
        delta, finish_reason = DeltaMessage(content=c.text), c.finish_reason
        if tool_streams is not None:
            calls = tool_streams[c.index]
            content, call_deltas = calls.feed(c.text, c.finish_reason is not None)
            delta = DeltaMessage(content=content or None, tool_calls=call_deltas or None)
            if calls.made_calls and finish_reason == "stop":
                finish_reason = "tool_calls"
            if delta.content is None and delta.tool_calls is None and finish_reason is None and logprobs is None:
                return None  # held back by the parser (a call's syntax may be forming)
        return ChatStreamChoice(index=c.index, delta=delta, logprobs=logprobs,
                                finish_reason=finish_reason, stop_reason=c.stop_reason)


def _worth_sending(c: CompletionOutput, req: ChatCompletionRequest) -> bool:
    """Tokens whose text is held back (a stop string may be forming) send nothing, unless
    their logprobs were asked for."""
    return bool(c.text) or c.finish_reason is not None or bool(req.logprobs and c.token_ids)
