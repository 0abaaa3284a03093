"""A request's structured-output spec -> a compiled llguidance grammar.

llguidance does the work: JSON schema, regex, Lark and GBNF (converted to Lark)
all become one grammar format that an ``LLMatcher`` follows token by token.
This module only maps our spec onto its entry points and turns its failures
into ``GrammarCompileError`` with a readable reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from tokenloom.sampling_params import InvalidParameter, StructuredOutputsParams

# JSON output may carry whitespace between tokens, as models are used to writing
# it (`{"a": 1}`), but only a short run: with unbounded whitespace a small model
# can fill the whole budget with newlines inside an object it never closes.
JSON_COMPILE_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,20}"}


class GrammarCompileError(InvalidParameter):
    """The spec is not a grammar llguidance can compile; ``reason`` says why. It names
    ``structured_outputs`` (the server re-labels it with the field the spec came from)."""

    def __init__(self, reason: str) -> None:
        super().__init__("structured_outputs", f"does not compile: {reason}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CompiledGrammar:
    """A grammar compiled for one tokenizer: ``new_matcher`` gives each sequence its own
    matcher, copied from a pristine one (a copy is far cheaper than a compile)."""

    pristine: llguidance.LLMatcher

    def new_matcher(self) -> llguidance.LLMatcher:
        return self.pristine.deep_copy()


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON serialisation) for ``spec``."""
    kind = spec.kind
    try:
        if kind == "json":
            schema = json.loads(spec.json) if isinstance(spec.json, str) else spec.json
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_COMPILE_OPTIONS)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                                 defaults=JSON_COMPILE_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.regex)
        if kind == "choice":
            # Lark string literals take JSON's escapes, so json.dumps quotes any choice.
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in spec.choice))
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(spec.grammar))
    except Exception as exc:  # noqa: BLE001 - the GBNF converter raises its own Exception subclasses
        raise GrammarCompileError(f"{kind}: {exc}") from exc


def compile_grammar(spec: StructuredOutputsParams, tokenizer: llguidance.LLTokenizer) -> CompiledGrammar:
    """Compile ``spec`` for ``tokenizer``; raises GrammarCompileError. Runs on a worker thread
    (llguidance releases the GIL while it builds the lexer)."""
    text = grammar_text(spec)
    matcher = llguidance.LLMatcher(tokenizer, text, log_level=0)
    if matcher.is_error():
        raise GrammarCompileError(f"{spec.kind}: {_first_line(matcher.get_error())}")
    return CompiledGrammar(matcher)


def _first_line(message: str) -> str:
    """llguidance's errors carry an ASCII-art pointer after the reason; keep the reason
    and the line that shows where."""
    lines = [line.rstrip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else "the grammar does not compile"
