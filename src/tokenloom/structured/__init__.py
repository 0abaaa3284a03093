"""Structured output: grammars compiled off the engine thread, one matcher per sequence,
and the batched token bitmask that the sampler applies first (see ``manager.py``)."""

from __future__ import annotations

from tokenloom.structured.grammar import GrammarCompileError, compile_grammar
from tokenloom.structured.manager import GrammarBitmask, SequenceGrammar, StructuredOutputManager

__all__ = [
    "GrammarBitmask",
    "GrammarCompileError",
    "SequenceGrammar",
    "StructuredOutputManager",
    "compile_grammar",
]
