"""Benchmark prompts, deterministic from a seed.

The random, shared-prefix and chat prompts are random whole words of the
model's vocabulary (tokens like ``Ġword`` / ``▁word``): such text re-encodes
to the same tokens, so a prompt of N random words is N tokens for every server
that uses the model's own tokenizer, and it can be sent as text to any
OpenAI-compatible endpoint. Lengths count what the server sees: the BOS it adds
and, for chat, the chat template around the messages are part of ``input_len``
(the random text is shortened by that overhead).

Workloads:
  random         every prompt ``input_len`` tokens, every output ``output_len`` tokens
  shared-prefix  one system prompt of ``shared_prefix_len`` random tokens ahead of
                 a unique user part; ``input_len`` tokens in all past the prefix
                 (many users behind one long system prompt)
  chat           mixed lengths: input ~ LogNormal(median input_len, sigma 0.6)
                 clipped to [16, 4 x input_len]; output ~ LogNormal(median
                 output_len, sigma 0.6) clipped to [8, 4 x output_len]; drawn
                 independently per request
  copy           chat requests that ask for a shipped paragraph or code block back,
                 verbatim or lightly edited (bench/text_prompts.py): the answer is
                 mostly in the prompt, what n-gram speculative decoding feeds on
  open           open-ended chat requests (stories, explanations) whose answer shares
                 nothing with the prompt: speculation's worst case

``copy`` and ``open`` are natural text, meant for ``--endpoint chat``, temperature 0
and ``--force-output none`` (the model may stop at EOS; output counts come from the
server's usage). ``input_len`` does not apply to them: a prompt is as long as its
instruction and passage, and ``prompt_len`` is that text encoded the way the server
sees it (chat template, BOS). ``output_len`` is max_tokens, as for the others.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from tokenloom.bench.text_prompts import copy_texts, open_texts
from tokenloom.engine.tokenizer import Tokenizer

WORKLOADS = ("random", "shared-prefix", "chat", "copy", "open")
TEXT_WORKLOADS = ("copy", "open")  # natural text; input_len does not apply
ENDPOINTS = ("completions", "chat")
CHAT_SIGMA = 0.6
CHAT_MIN_INPUT, CHAT_MIN_OUTPUT, CHAT_MAX_FACTOR = 16, 8, 4
_WORD_MARKERS = ("Ġ", "▁")
_MIN_WORD_TOKENS = 8
_FIT_ROUNDS = 16


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One prompt to send: a system prompt (chat endpoint only) and the user text."""

    system: str | None
    text: str  # the completion prompt, or the user message in chat
    prompt_len: int  # tokens the server sees, BOS and chat template included
    output_len: int  # tokens to ask for (max_tokens)

    def completion_prompt(self) -> str:
        return (self.system or "") + self.text

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return [*system, {"role": "user", "content": self.text}]


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """What to generate; ``num_prompts`` requests in all."""

    name: str
    num_prompts: int
    input_len: int
    output_len: int
    seed: int = 0
    shared_prefix_len: int = 0
    endpoint: str = "completions"

    def validate(self) -> None:
        if self.name not in WORKLOADS:
            raise ValueError(f"workload must be one of {WORKLOADS}, got {self.name!r}")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")
        if self.num_prompts < 1 or self.input_len < 1 or self.output_len < 1:
            raise ValueError("num_prompts, input_len and output_len must be at least 1")
        if self.name == "shared-prefix" and self.shared_prefix_len < 1:
            raise ValueError("the shared-prefix workload needs shared_prefix_len >= 1")


class WordSampler:
    """Draws text of an exact token count from a tokenizer's whole-word tokens."""

    def __init__(self, tokenizer: Tokenizer, rng: random.Random) -> None:
        self.tokenizer = tokenizer
        self.rng = rng
        self.word_ids = _word_token_ids(tokenizer)

    def text(self, num_tokens: int) -> str:
        """Text that encodes (no special tokens) to exactly ``num_tokens`` tokens."""
        ids = self.rng.choices(self.word_ids, k=num_tokens)
        for _ in range(_FIT_ROUNDS):
            text = self.tokenizer.decode(ids)
            # Every piece starts with a space, so a piece never merges with what precedes it.
            if not text.startswith(" "):
                text = " " + text
            encoded = self.tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == num_tokens:
                return text
            ids = encoded[:num_tokens] + self.rng.choices(self.word_ids, k=max(0, num_tokens - len(encoded)))
        raise ValueError(f"could not build a prompt of exactly {num_tokens} tokens with this tokenizer")


def build_workload(spec: WorkloadSpec, tokenizer: Tokenizer) -> list[BenchRequest]:
    """``spec.num_prompts`` requests; the same spec and tokenizer always give the same list."""
    spec.validate()
    if spec.name in TEXT_WORKLOADS:
        return _text_workload(spec, tokenizer)
    sampler = WordSampler(tokenizer, random.Random(f"{spec.seed}-text"))
    # Lengths come from their own stream, so they do not depend on the text drawn.
    length_rng = random.Random(f"{spec.seed}-lengths")
    system = sampler.text(spec.shared_prefix_len) if spec.name == "shared-prefix" else None
    requests = []
    for _ in range(spec.num_prompts):
        input_len, output_len = _draw_lengths(spec, length_rng)
        overhead = _request(spec.endpoint, tokenizer, system, "", output_len).prompt_len
        overhead -= spec.shared_prefix_len if system is not None else 0
        if input_len <= overhead:
            raise ValueError(f"input_len {input_len} leaves no room for text: the prompt's fixed part "
                             f"(BOS, chat template) is already {overhead} tokens")
        text = sampler.text(input_len - overhead)
        requests.append(_request(spec.endpoint, tokenizer, system, text, output_len))
    return requests


def _text_workload(spec: WorkloadSpec, tokenizer: Tokenizer) -> list[BenchRequest]:
    texts = (copy_texts if spec.name == "copy" else open_texts)(spec.num_prompts, spec.seed)
    return [_request(spec.endpoint, tokenizer, None, text, spec.output_len) for text in texts]


def _draw_lengths(spec: WorkloadSpec, rng: random.Random) -> tuple[int, int]:
    if spec.name != "chat":
        return spec.input_len, spec.output_len
    return (_lognormal_len(rng, spec.input_len, CHAT_MIN_INPUT),
            _lognormal_len(rng, spec.output_len, CHAT_MIN_OUTPUT))


def _lognormal_len(rng: random.Random, median: int, floor: int) -> int:
    value = round(rng.lognormvariate(math.log(median), CHAT_SIGMA))
    return max(min(floor, median), min(value, CHAT_MAX_FACTOR * median))


def _request(endpoint: str, tokenizer: Tokenizer, system: str | None, text: str, output_len: int) -> BenchRequest:
    request = BenchRequest(system=system, text=text, prompt_len=0, output_len=output_len)
    if endpoint == "chat":
        prompt_len = len(tokenizer.encode_chat(request.messages()))
    else:
        prompt_len = len(tokenizer.encode(request.completion_prompt()))
    return BenchRequest(system=system, text=text, prompt_len=prompt_len, output_len=output_len)


def _word_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of tokens that are a space followed by ASCII letters (``Ġhello``); any
    non-special token when the vocabulary has almost none of those."""
    words, others = [], []
    special = {tokenizer.bos_token_id, *tokenizer.eos_token_ids}
    for token_id in range(tokenizer.vocab_size):
        if token_id in special:
            continue
        token = tokenizer.backend.id_to_token(token_id) or ""
        if token[:1] in _WORD_MARKERS and token[1:].isascii() and token[1:].isalpha():
            words.append(token_id)
        elif token and not token.startswith("<"):
            others.append(token_id)
    return words if len(words) >= _MIN_WORD_TOKENS else words + others
