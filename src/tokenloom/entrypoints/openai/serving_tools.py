"""Tools in a chat request: the prompt they go into, the grammar that forces a call,
and the calls parsed out of the model's text, whole or streamed.

The parser (``--tool-call-parser``, or the one the chat template implies) decides
the call format: the grammar of a forced call (``tool_choice`` "required" or a
named function) writes that format, and the same parser reads it back, so a
forced call and one the model chose come out alike.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from tokenloom.engine.tokenizer import Tokenizer
from tokenloom.engine.tool_prompt import FunctionSpec, function_spec, render_conversation
from tokenloom.entrypoints.openai.protocol import ChatCompletionRequest, NamedToolChoice
from tokenloom.entrypoints.openai.responses import (
    AssistantMessage,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCallOut,
    ToolCallOut,
)
from tokenloom.entrypoints.openai.tool_parsers import StreamDelta, ToolParser, detect_tool_parser, get_tool_parser
from tokenloom.sampling_params import StructuredOutputsParams


@dataclass(frozen=True, slots=True)
class ToolContext:
    """A request's tools and what it allows the model to do with them."""

    parser: ToolParser
    functions: tuple[FunctionSpec, ...]
    choice: str | NamedToolChoice  # "none", "auto", "required" or one named function
    parallel: bool  # parallel_tool_calls: false keeps at most one call

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"

    def forced_call(self) -> StructuredOutputsParams | None:
        """tool_choice "required": one or more calls (one without parallel_tool_calls);
        named: exactly one call of that function. Arguments follow the tools' schemas."""
        if self.choice == "required":
            grammar = self.parser.call_grammar(self.functions, parallel=self.parallel)
        elif isinstance(self.choice, NamedToolChoice):
            named = tuple(f for f in self.functions if f.name == self.choice.function.name)
            grammar = self.parser.call_grammar(named, parallel=False)
        else:
            return None
        return StructuredOutputsParams(grammar=grammar)


def resolve_parser_name(configured: str, tokenizer: Tokenizer) -> str:
    return detect_tool_parser(tokenizer.chat_template) if configured == "auto" else configured


def tool_context(req: ChatCompletionRequest, parser_name: str) -> ToolContext | None:
    if not req.tools:
        return None
    functions = tuple(function_spec(t.model_dump(exclude_none=True)) for t in req.tools)
    return ToolContext(get_tool_parser(parser_name), functions, req.effective_tool_choice,
                       req.parallel_tool_calls is not False)


def render_prompt(req: ChatCompletionRequest, tokenizer: Tokenizer) -> str:
    """The conversation as prompt text, with the request's tools (``render_conversation``)."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    return render_conversation(tokenizer, [m.template_dict() for m in req.messages], tools)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_message(ctx: ToolContext, text: str, finish_reason: str | None) -> tuple[AssistantMessage, str | None]:
    """The assistant message (content and calls) and the finish reason ("tool_calls" when
    the model stopped after calling)."""
    parsed = ctx.parser.parse(text)
    calls = parsed.tool_calls if ctx.parallel else parsed.tool_calls[:1]
    if not calls:
        return AssistantMessage(content=text), finish_reason
    tool_calls = [ToolCallOut(id=new_call_id(), function=FunctionCallOut(name=c.name, arguments=c.arguments))
                  for c in calls]
    return (AssistantMessage(content=parsed.content, tool_calls=tool_calls),
            "tool_calls" if finish_reason == "stop" else finish_reason)


class ToolCallStream:
    """One choice's stream through the parser: content deltas and OpenAI tool-call deltas
    (the first delta of a call carries its id, type and name)."""

    def __init__(self, ctx: ToolContext) -> None:
        self._ctx = ctx
        self._streamer = ctx.parser.streamer()
        self._ids: dict[int, str] = {}

    @property
    def made_calls(self) -> bool:
        return bool(self._ids)

    def feed(self, text: str, finished: bool) -> tuple[str, list[DeltaToolCall]]:
        delta = self._streamer.feed(text) if text else StreamDelta("", ())
        if finished:
            tail = self._streamer.finish()
            delta = StreamDelta(delta.content + tail.content, delta.tool_calls + tail.tool_calls)
        calls = [self._openai_delta(c.index, c.name, c.arguments) for c in delta.tool_calls
                 if self._ctx.parallel or c.index == 0]
        return delta.content, calls

    def _openai_delta(self, index: int, name: str | None, arguments: str) -> DeltaToolCall:
        if name is None:
            return DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=arguments))
        self._ids[index] = new_call_id()
        return DeltaToolCall(index=index, id=self._ids[index], type="function",
                             function=DeltaFunctionCall(name=name, arguments=arguments))
