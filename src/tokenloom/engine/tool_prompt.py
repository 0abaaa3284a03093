"""Tools for chat templates that know nothing of tools.

A template that never reads its ``tools`` variable (SmolLM2's plain ChatML,
for one) would silently drop the tool list and the tool turns of a
conversation. For those, the tools are described in the system message and
the tool turns are written out as text in the Hermes format (``<tool_call>``
blocks), which the ``hermes`` tool parser then reads back from the output.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jinja2

from tokenloom.engine.chat_template import CONTENT_PART_SEPARATOR

if TYPE_CHECKING:
    from tokenloom.engine.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """One tool the model may call."""

    name: str
    description: str | None
    parameters: dict  # JSON schema of the arguments object


_PROMPT_HEAD = (
    "# Tools\n\n"
    "You may call one or more functions to help with the user's request. "
    "The functions you can call are described below, one JSON object per line, "
    "between <tools> and </tools>:\n<tools>\n"
)
_PROMPT_TAIL = (
    "\n</tools>\n\n"
    "To call a function, write its name and arguments as a JSON object between "
    "<tool_call> and </tool_call>, one block per call:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n'
    "Each result comes back to you between <tool_response> and </tool_response>."
)


def tools_system_prompt(tools: Sequence[FunctionSpec]) -> str:
    """System-prompt text that lists ``tools`` and teaches the Hermes call format."""
    lines = []
    for tool in tools:
        described: dict[str, Any] = {"name": tool.name}
        if tool.description:
            described["description"] = tool.description
        described["parameters"] = tool.parameters
        lines.append(json.dumps(described, ensure_ascii=False))
    return _PROMPT_HEAD + "\n".join(lines) + _PROMPT_TAIL


def render_conversation(tokenizer: Tokenizer, messages: list[dict], tools: Sequence[dict] | None = None,
                        add_generation_prompt: bool = True) -> str:
    """A conversation, with OpenAI-shaped ``tools`` (``{"type": "function", "function":
    {...}}``) and tool turns, as prompt text. A template that reads ``tools`` gets them
    as HF's ``apply_chat_template`` passes them (call arguments as objects); any other
    gets the generic prompt and the turns written out as Hermes text."""
    uses_tools = bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if not uses_tools:
        return tokenizer.apply_chat_template(messages, add_generation_prompt)
    if template_supports_tools(tokenizer.chat_template):
        return tokenizer.apply_chat_template([_arguments_as_objects(m) for m in messages], add_generation_prompt,
                                             tools=list(tools) if tools else None)
    functions = [function_spec(t) for t in tools] if tools else None
    return tokenizer.apply_chat_template(messages_for_generic_tools(messages, functions), add_generation_prompt)


def function_spec(tool: dict) -> FunctionSpec:
    """An OpenAI tool (``{"type": "function", "function": {name, description, parameters}}``)."""
    function = tool.get("function") if isinstance(tool, dict) else None
    if tool.get("type") != "function" or not isinstance(function, dict) or not function.get("name"):
        raise ValueError(f"a tool must be {{'type': 'function', 'function': {{'name': ...}}}}, got {tool!r}")
    return FunctionSpec(function["name"], function.get("description"),
                        function.get("parameters") or {"type": "object", "properties": {}})


def _arguments_as_objects(message: dict) -> dict:
    """Templates index into a call's arguments (``arguments | items``), so they get the
    object that OpenAI's JSON text encodes."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = dict(call.get("function") or {})
        try:
            function["arguments"] = json.loads(function.get("arguments") or "{}")
        except (TypeError, ValueError):
            pass  # not JSON text: the template gets it as it came
        calls.append({**call, "function": function})
    return {**message, "tool_calls": calls}


def template_supports_tools(chat_template: str | None) -> bool:
    """Whether the template source reads the ``tools`` variable."""
    if not chat_template:
        return False
    try:
        # Lexing (not parsing) needs none of the extensions the real environment has.
        tokens = list(jinja2.Environment().lex(chat_template))
    except jinja2.TemplateSyntaxError:
        return False
    return any(kind == "name" and value == "tools" for _, kind, value in tokens)


def messages_for_generic_tools(messages: list[dict], tools: Sequence[FunctionSpec] | None) -> list[dict]:
    """``messages`` rewritten so that any template renders their tool content.

    The tools prompt goes into the (first) system message; an assistant's
    ``tool_calls`` become ``<tool_call>`` blocks in its content; runs of
    ``tool`` messages become one user message of ``<tool_response>`` blocks.
    The input is not modified.
    """
    out: list[dict] = []
    previous_was_tool = False
    for message in messages:
        role = message.get("role")
        if role == "tool":
            block = f"<tool_response>\n{_text(message.get('content'))}\n</tool_response>"
            if previous_was_tool:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        elif role == "assistant" and message.get("tool_calls"):
            out.append(_assistant_with_calls(message))
        else:
            out.append(dict(message))
        previous_was_tool = role == "tool"
    if tools:
        _add_system_prompt(out, tools_system_prompt(tools))
    return out


def _assistant_with_calls(message: dict) -> dict:
    blocks = [_call_block(call.get("function") or {}) for call in message["tool_calls"]]
    text = _text(message.get("content"))
    converted = {key: value for key, value in message.items() if key != "tool_calls"}
    converted["content"] = "\n".join([text, *blocks] if text else blocks)
    return converted


def _call_block(function: dict) -> str:
    arguments = (function.get("arguments") or "").strip() or "{}"
    try:
        json.loads(arguments)
    except ValueError:
        # Not JSON (a client's mistake): keep it readable as a JSON string instead of breaking the block.
        arguments = json.dumps(arguments, ensure_ascii=False)
    name = json.dumps(function.get("name", ""), ensure_ascii=False)
    return f'<tool_call>\n{{"name": {name}, "arguments": {arguments}}}\n</tool_call>'


def _add_system_prompt(messages: list[dict], prompt: str) -> None:
    if messages and messages[0].get("role") == "system":
        existing = _text(messages[0].get("content"))
        messages[0] = {**messages[0], "content": f"{prompt}\n\n{existing}" if existing else prompt}
    else:
        messages.insert(0, {"role": "system", "content": prompt})


def _text(content: Any) -> str:
    """A message's content as text: text parts joined as the chat template joins them."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return CONTENT_PART_SEPARATOR.join(
        part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
