"""Request checks and tokenization: what can be done with a request before the engine
holds any state for it.

It needs only the tokenizer and two numbers of the engine (the vocabulary and the
context length), so it runs wherever the request arrives: in the engine's own
process (``LLMEngine.prepare_request``), or in the server's process when the
engine core runs in another one (``EngineCoreClient``). A ``PreparedRequest`` is
plain data: it crosses the process boundary as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenloom.engine.tokenizer import Tokenizer
from tokenloom.sampling_params import InvalidParameter, SamplingParams


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A validated, tokenized request, ready to be admitted."""

    request_id: str
    prompt: str | None  # None for a token-id prompt
    prompt_token_ids: list[int]
    params: SamplingParams


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def prepare(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> PreparedRequest:
        """Validate and tokenize; raises ValueError (InvalidParameter names the field)."""
        params.validate(self.vocab_size)
        prompt_text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_prompt(token_ids)
        if params.max_tokens is not None and len(token_ids) + params.max_tokens > self.max_model_len:
            raise InvalidParameter(
                "max_tokens", f"({params.max_tokens}) plus the prompt ({len(token_ids)} tokens) exceeds "
                f"the context length {self.max_model_len}")
        return PreparedRequest(request_id, prompt_text, token_ids, params)

    def _check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise InvalidParameter("prompt", "must contain at least one token")
        if len(token_ids) > self.max_model_len:
            raise InvalidParameter(
                "prompt", f"is {len(token_ids)} tokens long, more than the context length "
                f"{self.max_model_len}")
        vocab = self.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidParameter("prompt", f"token id {bad} is out of vocabulary (size {vocab})")
