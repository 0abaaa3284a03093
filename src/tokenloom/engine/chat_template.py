"""Chat templates: a conversation rendered to prompt text with the model's Jinja template.

Templates come with model files, i.e. from strangers, so they run in jinja2's
``ImmutableSandboxedEnvironment``: no file system, no Python internals, no
mutation of the data passed in. The environment follows Hugging Face's
conventions (what templates are written against): ``trim_blocks`` and
``lstrip_blocks``, ``raise_exception``, a ``tojson`` that does not escape HTML,
``strftime_now``, loop controls, and the ``{% generation %}`` block.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = Mapping[str, Any]

# A message's content may be a list of parts; text parts are joined with this (as vLLM does).
CONTENT_PART_SEPARATOR = "\n"
_COMPILED_CACHE_SIZE = 64


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered: no template, bad messages, or the template failed."""


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks.

    Serving only needs the text, so the block renders its body unchanged.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names, so a template cannot reach
    Python internals through attributes it sets itself."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_public(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_public(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_public(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a chat template may not set the attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; prompts want the JSON as is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


_ENV = _make_environment()


@functools.lru_cache(maxsize=_COMPILED_CACHE_SIZE)
def compile_chat_template(source: str) -> jinja2.Template:
    """The compiled template (each distinct source is compiled once)."""
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc} (line {exc.lineno})") from exc


def render_chat_template(source: str | None, messages: Sequence[Message], *, add_generation_prompt: bool,
                         special_tokens: Mapping[str, str], **extra: Any) -> str:
    """Render ``messages`` with the template ``source``.

    ``special_tokens`` gives the template's ``bos_token``/``eos_token``/...
    variables; ``extra`` adds template variables (``tools``, ``documents``,
    ``enable_thinking`` ...), plain JSON-like data only.
    """
    if source is None:
        raise ChatTemplateError("this model has no chat template, so it cannot be used for chat; "
                                "send a plain completion prompt instead")
    template = compile_chat_template(source)
    variables: dict[str, Any] = {"tools": None, "documents": None, **dict(special_tokens)}
    variables.update({name: _plain(value, name) for name, value in extra.items()})
    variables["messages"] = normalize_messages(messages)
    variables["add_generation_prompt"] = add_generation_prompt
    try:
        return template.render(**variables)
    except jinja2.exceptions.SecurityError as exc:
        raise ChatTemplateError(f"the chat template attempted an unsafe operation: {exc}") from exc
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template rejected the conversation: {exc}") from exc
    except (TypeError, LookupError, AttributeError, ArithmeticError, ValueError) as exc:
        # The template's own code failed on this input (e.g. adding None to a string).
        raise ChatTemplateError(f"the chat template failed on this conversation: {exc!r}") from exc


def normalize_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Plain-dict copies with a checked role and text content (parts joined)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} objects")
    return [_normalize_message(i, m) for i, m in enumerate(messages)]


def _normalize_message(index: int, message: Message) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise ChatTemplateError(
            f"{where} must be an object with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise ChatTemplateError(f"{where} needs a 'role' string")
    plain = {key: _plain(value, f"{where}.{key}") for key, value in message.items()}
    content = message.get("content")
    if content is None:
        # An assistant turn that only calls tools has no content.
        if not message.get("tool_calls"):
            raise ChatTemplateError(f"{where} needs 'content'")
        return plain
    plain["content"] = _content_text(content, where)
    return plain


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise ChatTemplateError(f"{where}.content must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ChatTemplateError(
                f"{where}.content[{j}]: only {{'type': 'text', 'text': ...}} parts are supported, got {kind!r}")
        texts.append(part["text"])
    return CONTENT_PART_SEPARATOR.join(texts)


def _plain(value: Any, where: str) -> Any:
    """A copy made only of JSON types: objects with methods never reach the template."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (str enums, numpy scalars) carry extra methods; keep only the base value.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value) if isinstance(value, int) else float(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ChatTemplateError(f"{where}: {type(value).__name__} values cannot be passed to a chat template")
