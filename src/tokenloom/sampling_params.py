"""SamplingParams: how one request's tokens are chosen and when it stops.

The field names follow vLLM / OpenAI so that users are at home at once.
``validate()`` raises ``ValueError`` naming the offending field; the server
turns that into a 400.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

_GREEDY_EPS = 1e-5


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    """Constrain a request's output to a language; exactly one kind is given.

    - ``json``: a JSON schema (dict or its JSON text): the output is one JSON value valid against it;
    - ``json_object``: any JSON object;
    - ``regex``: the whole output matches this regular expression (Rust ``regex`` syntax);
    - ``choice``: the output is exactly one of these strings;
    - ``grammar``: a context-free grammar, GBNF (llama.cpp's ``root ::= ...``) or Lark
      (llguidance's dialect, ``start: ...``, which may embed ``%json{...}`` schemas).

    The grammar itself is checked when it is compiled (``tokenloom.structured``); here
    only the shape of the request is.
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))

    @property
    def kind(self) -> str:
        """The one kind given (``validate`` guarantees there is exactly one)."""
        return self._given()[0]

    def _given(self) -> list[str]:
        return [k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False)]

    def spec_text(self) -> str:
        """The kind's specification as text: the compiled-grammar cache key (with ``kind``)."""
        value = getattr(self, self.kind)
        if self.kind == "json":  # one key for the same schema, given as an object or as text
            return json.dumps(json.loads(value) if isinstance(value, str) else value, sort_keys=True)
        if self.kind == "choice":
            return json.dumps(list(value))
        return "" if self.kind == "json_object" else value

    def validate(self, field_name: str = "structured_outputs") -> None:
        given = self._given()
        _check(len(given) == 1, field_name,
               f"must give exactly one of {', '.join(_STRUCTURED_KINDS)}; got "
               f"{', '.join(given) if given else 'none'}")
        kind = given[0]
        if kind == "json":
            _check(isinstance(self.json, (dict, str)), field_name, "json must be a JSON schema object")
            if isinstance(self.json, str):
                try:
                    _check(isinstance(json.loads(self.json), dict), field_name,
                           "json must be a JSON schema object")
                except json.JSONDecodeError as exc:
                    raise InvalidParameter(field_name, f"json is not valid JSON: {exc}") from None
        elif kind == "choice":
            _check(bool(self.choice) and all(isinstance(c, str) and c for c in self.choice), field_name,
                   "choice must be a non-empty list of non-empty strings")
        elif kind == "json_object":
            _check(self.json_object is True, field_name, "json_object must be true")
        else:
            value = getattr(self, kind)
            _check(isinstance(value, str) and value.strip() != "", field_name, f"{kind} must be a non-empty string")


_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1 as in vLLM) disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per sampled token (0: sampled only)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first out-of-range field."""
        _check(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        _check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "top_k", f"must be -1, 0 (disabled) or >= 1, got {self.top_k}")
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(self.repetition_penalty > 0, "repetition_penalty",
               f"must be > 0, got {self.repetition_penalty}")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty",
               f"must be in [-2, 2], got {self.presence_penalty}")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty",
               f"must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
               f"must be >= 1, got {self.max_tokens}")
        _check(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _check(self.logprobs is None or self.logprobs >= 0, "logprobs",
               f"must be >= 0, got {self.logprobs}")
        _check(self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs",
               f"must be >= 0, got {self.prompt_logprobs}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "must be non-empty strings")
        _check(self.seed is None or 0 <= self.seed < 2**63, "seed",
               f"must be in [0, 2**63), got {self.seed}")
        if self.logit_bias:
            for tok, bias in self.logit_bias.items():
                _check(-100 <= bias <= 100, "logit_bias", f"bias for token {tok} must be in [-100, 100]")
        if self.structured_outputs is not None:
            self.structured_outputs.validate()
        if vocab_size is not None:
            self._validate_token_ids(vocab_size)

    def _validate_token_ids(self, vocab_size: int) -> None:
        for tok in self.stop_token_ids:
            _check(0 <= tok < vocab_size, "stop_token_ids", f"token id {tok} is out of vocabulary")
        for tok in self.logit_bias or {}:
            _check(0 <= int(tok) < vocab_size, "logit_bias", f"token id {tok} is out of vocabulary")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or value <= vocab_size, name, f"must be <= vocab size {vocab_size}")


class InvalidParameter(ValueError):
    """A ValueError that remembers which field was wrong (the server's 400 ``param``)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name} {message}")
        self.field_name = field_name


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise InvalidParameter(field_name, message)
