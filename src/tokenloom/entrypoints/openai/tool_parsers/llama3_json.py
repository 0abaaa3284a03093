"""Llama 3 JSON tool calls: the whole response is ``{"name": ..., "parameters": {...}}``
objects separated by ``;``, optionally after ``<|python_tag|>``.

What a response means:
- If it does not open (after whitespace and the optional tag) with ``{``, it
  is plain content, all of it, tag included.
- A name-first object (``{"name": "f", "parameters": {``) commits there: its
  name goes out and its arguments stream verbatim until their object closes
  (or the output ends: a call truncated by max_tokens keeps what it got).
  After it, text up to the next ``;`` is dropped, and so is a later object
  that turns out not to be a call.
- Any other opening object is held to the end of the output and then judged
  with the rest: if the whole response is ``;``-separated call objects (keys
  in any order, "arguments" for "parameters", arguments as a JSON string),
  those are the calls; otherwise the whole text is content.
- Content is None whenever there are calls.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tokenloom.engine.tool_prompt import FunctionSpec
from tokenloom.entrypoints.openai.tool_parsers._base import (
    ParsedToolCall,
    ToolCallStreamer,
    ToolParser,
    call_grammar,
    scan_call,
    skip_whitespace,
)

PYTHON_TAG = "<|python_tag|>"
_LEAD = re.compile(r"\s*(?:<\|python_tag\|>\s*)?")


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def streamer(self) -> ToolCallStreamer:
        return Llama3JsonStreamer()

    def call_grammar(self, tools: Sequence[FunctionSpec], *, parallel: bool) -> str:
        # No <|python_tag|>: it is a special token, and the calls parse the same without it.
        return call_grammar(tools, arguments_key="parameters", before="", after="",
                            separator="; ", parallel=parallel)


class Llama3JsonStreamer(ToolCallStreamer):
    def __init__(self) -> None:
        super().__init__()
        self._state = self._at_start
        self._lead = ""  # whitespace and tag before the first object: content if there is no call

    def _at_start(self, final: bool) -> bool:
        lead = _LEAD.match(self._buf).end()  # type: ignore[union-attr]
        rest = self._buf[lead:]
        if rest.startswith("{"):
            self._lead, self._buf = self._buf[:lead], rest
            self._state = self._first_call
            return True
        if PYTHON_TAG.startswith(rest) and not final:
            return False  # only whitespace, or a tag still arriving
        self._state = self._plain
        return True

    def _first_call(self, final: bool) -> bool:
        if self._start_canonical_call(self._buf):
            self._state = self._in_arguments
            return True
        if not final:
            return False
        calls = _scan_calls(self._buf)
        if calls is None:
            self._buf = self._lead + self._buf
            self._state = self._plain
            return True
        self._emit_calls(calls)
        return False

    def _in_arguments(self, final: bool) -> bool:
        if self._stream_arguments(None, final) is None:
            return False
        self._state = self._after_call
        return True

    def _after_call(self, final: bool) -> bool:
        separator = self._buf.find(";")
        if separator < 0:
            self._buf = ""
            return False
        self._buf = self._buf[separator + 1:]
        self._state = self._next_call
        return True

    def _next_call(self, final: bool) -> bool:
        if self._start_canonical_call(self._buf):
            self._state = self._in_arguments
            return True
        if final:
            self._emit_calls(_scan_calls(self._buf) or [])
        return False

    def _emit_calls(self, calls: list[ParsedToolCall]) -> None:
        for call in calls:
            self._start_call(call.name, call.arguments)
        self._buf = ""


def _scan_calls(text: str) -> list[ParsedToolCall] | None:
    """``;``-separated call objects filling ``text`` (a trailing ``;`` allowed); None if it is not that."""
    calls = []
    pos = skip_whitespace(text, 0)
    while pos < len(text):
        found = scan_call(text, pos)
        if found is None:
            return None
        calls.append(found[0])
        pos = skip_whitespace(text, found[1])
        if text.startswith(";", pos):
            pos = skip_whitespace(text, pos + 1)
        elif pos < len(text):
            return None
    return calls
