"""Engine logprobs (``{token id: Logprob}`` per position) in OpenAI's two formats.

Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.
Completions: parallel lists ``tokens`` / ``token_logprobs`` / ``top_logprobs`` /
``text_offset``; with ``echo`` the prompt's tokens come first and the very
first one has no logprob (nothing precedes it).
"""

from __future__ import annotations

from tokenloom.engine.tokenizer import Tokenizer
from tokenloom.entrypoints.openai.responses import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from tokenloom.request import Logprob, PositionLogprobs

# JSON has no -inf; a token that was masked out gets this (vLLM's convention).
MIN_LOGPROB = -9999.0


def _value(logprob: Logprob) -> float:
    return max(logprob.logprob, MIN_LOGPROB)


def _top(entry: PositionLogprobs, k: int) -> list[tuple[int, Logprob]]:
    """The k most likely tokens; the chosen token is in the entry too, top-k or not."""
    return sorted(entry.items(), key=lambda item: -item[1].logprob)[:k]


def _text(logprob: Logprob, token_id: int, tokenizer: Tokenizer) -> str:
    return logprob.decoded_token if logprob.decoded_token is not None else tokenizer.decode_token(token_id)


def chat_logprobs(token_ids: list[int], entries: list[PositionLogprobs], num_top: int,
                  tokenizer: Tokenizer) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry[token_id]
        text = _text(chosen, token_id, tokenizer)
        top = [TopLogprob(token=(t := _text(lp, tid, tokenizer)), logprob=_value(lp), bytes=list(t.encode()))
               for tid, lp in _top(entry, num_top)]
        content.append(TokenLogprob(token=text, logprob=_value(chosen), bytes=list(text.encode()),
                                    top_logprobs=top))
    return ChatLogprobs(content=content)


class CompletionLogprobsBuilder:
    """Builds the completions format for one choice, chunk by chunk (``text_offset``
    carries over between chunks of a stream)."""

    def __init__(self, num_top: int, tokenizer: Tokenizer) -> None:
        self.num_top = num_top
        self.tokenizer = tokenizer
        self.offset = 0

    def prompt(self, prompt_ids: list[int], entries: list[PositionLogprobs | None]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for token_id, entry in zip(prompt_ids, entries):
            if entry is None:  # the first prompt token: nothing scores it
                self._append(out, self.tokenizer.decode_token(token_id), None, None)
            else:
                self._append_entry(out, token_id, entry)
        return out

    def completion(self, token_ids: list[int], entries: list[PositionLogprobs]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for token_id, entry in zip(token_ids, entries):
            self._append_entry(out, token_id, entry)
        return out

    def _append_entry(self, out: CompletionLogprobs, token_id: int, entry: PositionLogprobs) -> None:
        chosen = entry[token_id]
        top = {_text(lp, tid, self.tokenizer): _value(lp) for tid, lp in _top(entry, self.num_top)}
        self._append(out, _text(chosen, token_id, self.tokenizer), _value(chosen), top)

    def _append(self, out: CompletionLogprobs, text: str, logprob: float | None,
                top: dict[str, float] | None) -> None:
        out.tokens.append(text)
        out.token_logprobs.append(logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(self.offset)
        self.offset += len(text)


def join_completion_logprobs(parts: list[CompletionLogprobs]) -> CompletionLogprobs:
    joined = CompletionLogprobs()
    for part in parts:
        joined.tokens += part.tokens
        joined.token_logprobs += part.token_logprobs
        joined.top_logprobs += part.top_logprobs
        joined.text_offset += part.text_offset
    return joined
