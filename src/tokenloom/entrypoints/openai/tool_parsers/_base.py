"""What every tool parser shares: the result types, the streamer's bookkeeping,
JSON scanning helpers, and the call-grammar builder.

One machine, two uses: ``ToolParser.parse`` runs the format's streamer over
the whole text in one piece, so a complete response and its stream agree by
construction as long as the streamer decides the same for every split of the
text (what the tests check). The streamer's decisions therefore only ever look
at text it has, and wait when more text could change them.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from tokenloom.engine.tool_prompt import FunctionSpec


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    name: str
    arguments: str  # JSON text of the arguments object as the model wrote it; "{}" when it gave none


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    content: str | None  # text before the calls; None when there are calls and no such text
    tool_calls: tuple[ParsedToolCall, ...]


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    index: int  # 0, 1, ... in order of appearance
    name: str | None  # only on a call's first delta
    arguments: str  # the next fragment of the arguments JSON text


@dataclass(frozen=True, slots=True)
class StreamDelta:
    content: str
    tool_calls: tuple[ToolCallDelta, ...]


# The canonical start of a call object, name first: once it is seen the call is
# committed (its name goes out and its arguments stream as they grow). Anchored
# and ending in a lookahead for the arguments' "{", so it matches a prefix of the
# text exactly when it matches the whole text: the decision does not depend on
# where the text was split.
CALL_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*"((?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))+)"'
    r'\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')

_JSON = json.JSONDecoder()
_WHITESPACE = re.compile(r"\s*")


class ToolCallStreamer:
    """Incremental parse of one choice's output.

    Subclasses are state machines: ``self._state`` is the method for where the
    parse is; each state consumes what it can of ``self._buf``, reports through
    ``_emit_content`` / ``_start_call`` / ``_emit_arguments``, and returns True to
    be called again (it may have moved to another state) or False to wait for text.
    """

    def __init__(self) -> None:
        self._state: Callable[[bool], bool] = self._plain
        self._buf = ""  # received, not yet consumed
        self._content: list[str] = []  # output of the current feed()/finish()
        self._deltas: list[ToolCallDelta] = []
        self._num_calls = 0
        self._scanner = _ObjectEnd()

    def feed(self, text: str) -> StreamDelta:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> StreamDelta:
        """End of output: decide everything that was held back."""
        return self._run(final=True)

    def _run(self, final: bool) -> StreamDelta:
        while self._state(final):
            pass
        delta = StreamDelta("".join(self._content), tuple(self._deltas))
        self._content, self._deltas = [], []
        return delta

    def _plain(self, final: bool) -> bool:
        """The state once the output is known to be text: all of it is content."""
        self._emit_content(self._buf)
        self._buf = ""
        return False

    def _emit_content(self, text: str) -> None:
        if text:
            self._content.append(text)

    def _start_call(self, name: str, arguments: str = "") -> None:
        self._deltas.append(ToolCallDelta(self._num_calls, name, arguments))
        self._num_calls += 1
        self._scanner = _ObjectEnd()

    def _emit_arguments(self, fragment: str) -> None:
        if not fragment:
            return
        last = self._deltas[-1] if self._deltas else None
        if last is not None and last.index == self._num_calls - 1:
            # One delta per call per feed: fragments of the same call merge.
            self._deltas[-1] = ToolCallDelta(last.index, last.name, last.arguments + fragment)
        else:
            self._deltas.append(ToolCallDelta(self._num_calls - 1, None, fragment))

    def _start_canonical_call(self, text: str) -> bool:
        """Start a call if ``text`` (a prefix of the buffer) opens with a canonical call
        head; the buffer then begins at the arguments' "{"."""
        match = CALL_HEAD.match(text)
        if match:
            self._start_call(json.loads(f'"{match.group(1)}"'))
            self._buf = self._buf[match.end():]
        return match is not None

    def _stream_arguments(self, end_tag: str | None, final: bool) -> bool | None:
        """Pass the current call's arguments object through as it arrives.

        True: the object closed; False: ``end_tag`` (outside any string) cut it
        short, or the output ended; None: waiting for text. Only string, escape
        and bracket depth are tracked: the arguments are the model's own text,
        verbatim, and like OpenAI's they are not guaranteed to be valid JSON.
        """
        buf, scanner = self._buf, self._scanner
        for i, ch in enumerate(buf):
            if end_tag and ch == end_tag[0] and not scanner.in_string:
                rest = buf[i:]
                if rest.startswith(end_tag) or (end_tag.startswith(rest) and not final):
                    self._emit_arguments(buf[:i])
                    self._buf = rest
                    return False if rest.startswith(end_tag) else None
            if scanner.step(ch):
                self._emit_arguments(buf[:i + 1])
                self._buf = buf[i + 1:]
                return True
        self._emit_arguments(buf)
        self._buf = ""
        return False if final else None


class _ObjectEnd:
    """Follows JSON text char by char just far enough to see where its first object ends."""

    __slots__ = ("depth", "in_string", "escaped")

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def step(self, ch: str) -> bool:
        """Take one char; True when it closes the outermost object."""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            return self.depth == 0
        return False


class ToolParser(ABC):
    name: ClassVar[str]

    @abstractmethod
    def streamer(self) -> ToolCallStreamer:
        """A fresh incremental parser for one choice."""

    @abstractmethod
    def call_grammar(self, tools: Sequence[FunctionSpec], *, parallel: bool) -> str:
        """A Lark grammar (llguidance dialect): one call (or, with ``parallel``, one or
        more) in this format, each to one of ``tools`` with schema-valid arguments."""

    def parse(self, text: str) -> ParsedMessage:
        streamer = self.streamer()
        return collect_deltas([streamer.feed(text), streamer.finish()])


def collect_deltas(deltas: Sequence[StreamDelta]) -> ParsedMessage:
    """The message a stream of deltas adds up to."""
    content = "".join(d.content for d in deltas)
    names: list[str] = []
    arguments: list[str] = []
    for call in (c for d in deltas for c in d.tool_calls):
        if call.name is not None:
            names.append(call.name)
            arguments.append("")
        arguments[call.index] += call.arguments
    calls = tuple(ParsedToolCall(n, a) for n, a in zip(names, arguments))
    return ParsedMessage(None if calls and not content.strip() else content, calls)


# -- whole-object parsing (calls not in the canonical name-first form) -----------


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that could be the start of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def skip_whitespace(text: str, pos: int) -> int:
    return _WHITESPACE.match(text, pos).end()  # type: ignore[union-attr]


def scan_call(text: str, pos: int) -> tuple[ParsedToolCall, int] | None:
    """The call object starting at ``text[pos]`` and the index after it; None if it is not one.

    Keys in any order; "parameters" stands for "arguments"; arguments may be an
    object, a JSON string holding an object, or absent ("{}").
    """
    members = _scan_object(text, pos)
    if members is None:
        return None
    fields, end = members
    name = fields.get("name", (None, ""))[0]
    value, raw = fields.get("arguments") or fields.get("parameters") or ({}, "{}")
    if not isinstance(name, str) or not name:
        return None
    if isinstance(value, str):
        try:
            inner = json.loads(value)
        except ValueError:
            return None
        value, raw = inner, value.strip()
    return (ParsedToolCall(name, raw), end) if isinstance(value, dict) else None


def _scan_object(text: str, pos: int) -> tuple[dict[str, tuple[Any, str]], int] | None:
    """The object at ``text[pos]`` as key -> (value, its raw text), and the index after it."""
    if not text.startswith("{", pos):
        return None
    fields: dict[str, tuple[Any, str]] = {}
    pos = skip_whitespace(text, pos + 1)
    if text.startswith("}", pos):
        return fields, pos + 1
    while True:
        try:
            key, pos = _JSON.raw_decode(text, pos)
            pos = skip_whitespace(text, pos)
            if not isinstance(key, str) or not text.startswith(":", pos):
                return None
            start = skip_whitespace(text, pos + 1)
            value, pos = _JSON.raw_decode(text, start)
        except ValueError:
            return None
        fields[key] = (value, text[start:pos])
        pos = skip_whitespace(text, pos)
        if text.startswith("}", pos):
            return fields, pos + 1
        if not text.startswith(",", pos):
            return None
        pos = skip_whitespace(text, pos + 1)


# -- call grammars ---------------------------------------------------------------

# Whitespace the grammar allows between JSON tokens: none or one space, so both
# {"a":1} and {"a": 1} pass, but the model cannot pad forever.
_JSON_OPTIONS = {"whitespace_pattern": "[ ]?"}


def call_grammar(tools: Sequence[FunctionSpec], *, arguments_key: str, before: str, after: str,
                 separator: str, parallel: bool) -> str:
    """A Lark grammar: ``before`` + a call object + ``after``, once or (``parallel``)
    repeated with ``separator``; one JSON-schema alternative per tool."""
    if not tools:
        raise ValueError("a call grammar needs at least one tool")
    rules = [f"tool_{i}: %json{json.dumps(_call_schema(t, arguments_key))}" for i, t in enumerate(tools)]
    alternatives = " | ".join(f"tool_{i}" for i in range(len(tools)))
    body = " ".join(part for part in (_lark_literal(before), f"({alternatives})", _lark_literal(after)) if part)
    start = f"call ({_lark_literal(separator)} call)*" if parallel else "call"
    return "\n".join([f"start: {start}", f"call: {body}", *rules]) + "\n"


def _call_schema(tool: FunctionSpec, arguments_key: str) -> dict[str, Any]:
    arguments = closed_objects(tool.parameters)
    arguments.setdefault("type", "object")
    schema: dict[str, Any] = {
        "type": "object",
        # Properties come out in schema order: the name first, as the streamer wants it.
        "properties": {"name": {"const": tool.name}, arguments_key: arguments},
        "required": ["name", arguments_key],
        "additionalProperties": False,
        "x-guidance": _JSON_OPTIONS,
    }
    # References like "#/$defs/x" resolve against the root, which is now the call object.
    for defs in ("$defs", "definitions"):
        if defs in arguments:
            schema[defs] = arguments.pop(defs)
    return schema


def closed_objects(schema: Any) -> Any:
    """A copy of ``schema`` in which every object that lists ``properties`` and leaves
    ``additionalProperties`` unset allows no others, as OpenAI's strict mode has them.
    A forced call is held to its tool's arguments: left open, a small model invents
    keys and nests them until it runs out of tokens."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: closed_objects(value) for key, value in schema.items()}
    if "properties" in closed and "additionalProperties" not in closed and "patternProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


def _lark_literal(text: str) -> str:
    return json.dumps(text) if text else ""
