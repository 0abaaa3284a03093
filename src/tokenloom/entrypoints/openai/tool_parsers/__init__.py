"""Tool calls in model output: from text to OpenAI ``tool_calls``, whole or streamed,
and the grammars that force a model to make one (``tool_choice`` "required" or named).

``get_tool_parser(name)`` gives a parser; ``detect_tool_parser(chat_template)``
picks the name that fits a model's chat template.
"""

from __future__ import annotations

from tokenloom.engine.tool_prompt import FunctionSpec
from tokenloom.entrypoints.openai.tool_parsers._base import (
    ParsedMessage,
    ParsedToolCall,
    StreamDelta,
    ToolCallDelta,
    ToolCallStreamer,
    ToolParser,
)
from tokenloom.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from tokenloom.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
}

__all__ = [
    "TOOL_PARSERS", "FunctionSpec", "ParsedMessage", "ParsedToolCall", "StreamDelta", "ToolCallDelta",
    "ToolCallStreamer", "ToolParser", "detect_tool_parser", "get_tool_parser",
]


def get_tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}") from None


def detect_tool_parser(chat_template: str | None) -> str:
    """The parser for a model's chat template.

    Llama 3 templates call tools with JSON after ``<|python_tag|>`` or in the
    ``ipython`` role. Everything else gets Hermes: Hermes and Qwen templates
    write ``<tool_call>`` blocks, and templates without tools are taught that
    format by the generic tools prompt.
    """
    template = chat_template or ""
    if "<tool_call>" not in template and ("<|python_tag|>" in template or "ipython" in template):
        return Llama3JsonToolParser.name
    return HermesToolParser.name
