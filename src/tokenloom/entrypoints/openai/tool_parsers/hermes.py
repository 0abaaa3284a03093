"""Hermes / Qwen tool calls: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.

What a response means:
- Text before the first ``<tool_call>`` is the content (trailing whitespace
  dropped when calls follow). Text between and after calls is dropped, as in
  vLLM: models write little there, mostly restating the calls.
- A block whose body opens name-first (``{"name": "f", "arguments": {``)
  commits there: its name goes out and its arguments stream verbatim until
  their object closes (or ``</tool_call>`` or the end of output cuts them
  short: a call truncated by max_tokens keeps the arguments text it got).
- Any other body is held until its ``</tool_call>`` (or the end of output)
  and then judged whole: a call object in any key order, "parameters" for
  "arguments", arguments as a JSON string, arguments absent.
- If the first block is not a call (not JSON, no name, cut off before its
  head), the model made no call: the whole text is content. A broken later
  block is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenloom.engine.tool_prompt import FunctionSpec
from tokenloom.entrypoints.openai.tool_parsers._base import (
    ToolCallStreamer,
    ToolParser,
    call_grammar,
    partial_suffix,
    scan_call,
    skip_whitespace,
)

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def streamer(self) -> ToolCallStreamer:
        return HermesStreamer()

    def call_grammar(self, tools: Sequence[FunctionSpec], *, parallel: bool) -> str:
        return call_grammar(tools, arguments_key="arguments", before=START + "\n", after="\n" + END,
                            separator="\n", parallel=parallel)


class HermesStreamer(ToolCallStreamer):
    def __init__(self) -> None:
        super().__init__()
        self._state = self._before_calls
        # Trailing whitespace of the content: dropped if a call follows, sent otherwise.
        self._held_whitespace = ""

    def _before_calls(self, final: bool) -> bool:
        start = self._buf.find(START)
        if start < 0:
            # Hold what may be the beginning of a split "<tool_call>".
            keep = 0 if final else partial_suffix(self._buf, START)
            self._content_before_calls(self._buf[:len(self._buf) - keep], final)
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        self._content_before_calls(self._buf[:start], final=False)
        self._buf = self._buf[start + len(START):]
        self._state = self._in_block
        return True

    def _content_before_calls(self, text: str, final: bool) -> None:
        text = self._held_whitespace + text
        kept = text if final else text.rstrip()
        self._emit_content(kept)
        self._held_whitespace = text[len(kept):]

    def _in_block(self, final: bool) -> bool:
        end = self._buf.find(END)
        body = self._buf if end < 0 else self._buf[:end]
        if self._start_canonical_call(body):
            self._held_whitespace = ""
            self._state = self._in_arguments
            return True
        if end < 0 and not final:
            return False
        block = self._buf if end < 0 else self._buf[:end + len(END)]
        self._buf = self._buf[len(block):]
        found = scan_call(body, skip_whitespace(body, 0))
        if found is not None and not body[found[1]:].strip():
            self._start_call(found[0].name, found[0].arguments)
        elif self._num_calls == 0:
            # The model made no valid call: everything it wrote is content.
            self._emit_content(self._held_whitespace + START + block)
            self._state = self._plain
            return True
        self._held_whitespace = ""
        self._state = self._between_calls
        return True

    def _in_arguments(self, final: bool) -> bool:
        if self._stream_arguments(END, final) is None:
            return False
        self._state = self._between_calls
        return True

    def _between_calls(self, final: bool) -> bool:
        start = self._buf.find(START)
        if start < 0:
            keep = 0 if final else partial_suffix(self._buf, START)
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        self._buf = self._buf[start + len(START):]
        self._state = self._in_block
        return True
