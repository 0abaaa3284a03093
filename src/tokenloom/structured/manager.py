"""StructuredOutputManager: compiles grammars off the engine thread and fills the
step's token bitmask.

::

    server / LLM (any thread)        worker pool (2 threads)        engine thread
    -------------------------        -----------------------        -------------------------
    compile(spec) -> Future  ----->  LLTokenizer (once),      ...   scheduler skips a sequence
      (cached by kind + spec)        LLMatcher per spec             until its Future is done;
                                                                    fill_bitmask(rows) per step;
                                                                    the matcher consumes each
                                                                    sampled token (scheduler)

A compiled grammar is a pristine matcher; each sequence deep-copies it, so a
cache hit costs a copy, not a compile.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import llguidance.torch
import torch

from tokenloom.engine.tokenizer import Tokenizer
from tokenloom.sampling_params import StructuredOutputsParams
from tokenloom.structured.grammar import CompiledGrammar, compile_grammar

COMPILE_WORKERS = 2
CACHE_SIZE = 512
# Masks are filled on the engine thread (~10 us a row) unless a batch is large on a
# machine with cores to spare: llguidance's parallel fill runs on a Rayon pool whose
# threads spin after their work, and on a 2-core machine they took the cores from
# the next forward's OpenMP threads (a 32-row JSON batch ran 20% slower, in half
# its runs; sequential, 0.3 ms a step).
PARALLEL_FILL_MIN_ROWS = 64
PARALLEL_FILL_MIN_CPUS = 8


@dataclass(frozen=True, slots=True)
class GrammarBitmask:
    """Engine -> runner: the allowed tokens of the constrained rows of one step.

    Bit ``t % 32`` of word ``t // 32`` in a row is set when token t may be sampled.
    """

    request_ids: tuple[str, ...]  # the sequences the rows belong to
    bitmask: torch.Tensor  # [num_rows, ceil(vocab_size / 32)] int32


class SequenceGrammar:
    """One sequence's grammar: a compile in flight, then a matcher that has consumed
    exactly the sequence's output tokens so far (it survives preemption, since
    recompute keeps the output tokens)."""

    __slots__ = ("_compiled", "_matcher")

    def __init__(self, compiled: Future[CompiledGrammar]) -> None:
        self._compiled = compiled
        self._matcher: llguidance.LLMatcher | None = None

    @property
    def compiled(self) -> Future[CompiledGrammar]:
        return self._compiled

    @property
    def is_ready(self) -> bool:
        """True once compiled (or failed: see ``error``)."""
        return self._compiled.done()

    @property
    def error(self) -> str | None:
        if not self._compiled.done() or self._compiled.exception() is None:
            return None
        return str(self._compiled.exception())

    @property
    def matcher(self) -> llguidance.LLMatcher:
        if self._matcher is None:
            self._matcher = self._compiled.result().new_matcher()
        return self._matcher

    def accept(self, token_id: int) -> bool:
        """Advance on a sampled token; False when the grammar does not allow it."""
        return self.matcher.consume_token(token_id)

    def num_valid(self, token_ids: Sequence[int]) -> int:
        """How many of ``token_ids`` the grammar would accept in a row from here (the state
        does not change): speculative drafts past that could never be kept."""
        return self.matcher.validate_tokens(list(token_ids))

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and allows nothing more (EOS excepted)."""
        return self.matcher.is_stopped()


class StructuredOutputManager:
    """Compiled grammars for one tokenizer, cached by (kind, spec); thread-safe."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int],
                 cache_size: int = CACHE_SIZE) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._cache_size = cache_size
        self._pool = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="tokenloom-grammar")
        self._lock = threading.Lock()  # the cache
        self._tokenizer_lock = threading.Lock()  # held while the LLTokenizer is built
        self._cache: OrderedDict[tuple[str, str], Future[CompiledGrammar]] = OrderedDict()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None

    def compile(self, spec: StructuredOutputsParams) -> Future[CompiledGrammar]:
        """The compiled grammar of ``spec`` (a cached Future, or a new compile on the pool).
        The Future's exception is a GrammarCompileError when the spec does not compile."""
        key = (spec.kind, spec.spec_text())
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[key] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return future

    def sequence_grammar(self, spec: StructuredOutputsParams) -> SequenceGrammar:
        return SequenceGrammar(self.compile(spec))

    def fill_bitmask(self, grammars: Sequence[SequenceGrammar],
                     drafts: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """[rows, words] int32: each ready grammar's allowed next tokens. With ``drafts``
        (speculative decoding; tokens the grammar accepts), a grammar has one row per draft
        more: its allowed tokens after each prefix of them (the matcher is rolled back)."""
        if drafts is not None and any(drafts):
            return self._fill_bitmask_with_drafts(grammars, drafts)
        bitmask = llguidance.torch.allocate_token_bitmask(len(grammars), self.vocab_size)
        if len(grammars) >= PARALLEL_FILL_MIN_ROWS and (os.cpu_count() or 1) >= PARALLEL_FILL_MIN_CPUS:
            llguidance.torch.fill_next_token_bitmask_par(
                self._parallel_executor(), [(g.matcher, i) for i, g in enumerate(grammars)], bitmask)
        else:
            for i, g in enumerate(grammars):
                llguidance.torch.fill_next_token_bitmask(g.matcher, bitmask, i)
        return bitmask

    def _fill_bitmask_with_drafts(self, grammars: Sequence[SequenceGrammar],
                                  drafts: Sequence[Sequence[int]]) -> torch.Tensor:
        bitmask = llguidance.torch.allocate_token_bitmask(sum(1 + len(d) for d in drafts), self.vocab_size)
        row = 0
        for grammar, tokens in zip(grammars, drafts):
            matcher = grammar.matcher
            for i in range(len(tokens) + 1):
                llguidance.torch.fill_next_token_bitmask(matcher, bitmask, row)
                row += 1
                if i < len(tokens) and not matcher.consume_token(tokens[i]):
                    raise ValueError(f"draft token {tokens[i]} is not allowed by the grammar")
            if tokens:
                matcher.rollback(len(tokens))
        return bitmask

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        return compile_grammar(spec, self.ll_tokenizer())

    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of our tokenizer, built once (~0.4 s for a 49k vocabulary)."""
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=self._eos_token_ids)
            return self._ll_tokenizer

    def _parallel_executor(self) -> llguidance.LLExecutor:
        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=min(8, (os.cpu_count() or 2) // 2))
        return self._executor
