"""Incremental detokenization: token ids in, text deltas out, stop strings applied.

Text cannot be decoded one token at a time: a UTF-8 character may be split
over several byte-level tokens, and a SentencePiece token's leading space
depends on what precedes it. So each step decodes a short window of recent
tokens twice, with and without the new ones, and releases the difference,
but only once it no longer ends in an incomplete character:

    _ids:  | context: released at the last step | pending: not yet released |
           0                                   read_offset

Released text is then checked for stop strings. A tail that could still grow
into a stop string is held back until the next tokens decide it.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenloom.engine.tokenizer import Tokenizer

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as context, so that the first output token's leading
# space (SentencePiece "▁") comes out as it does in the middle of a text.
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """The text of one sequence, built up as its tokens arrive.

    ``add_tokens`` returns the text newly released by those tokens;
    concatenated, the returned pieces (plus ``flush()``) equal the one-shot
    decode of all tokens, cut at the first stop string. Text is never released
    while it ends in an incomplete UTF-8 character or could still be the start
    of a stop string. A matched stop string is left out of the text unless
    ``include_stop_str_in_output``; tokens after it add no text and are not
    counted in ``num_tokens``.
    ``prompt_token_ids``, when given, are decoding context only.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool, stop: Sequence[str],
                 include_stop_str_in_output: bool = False, prompt_token_ids: Sequence[int] = ()) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._backend = tokenizer.backend
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(dict.fromkeys(stop))
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._include_stop = include_stop_str_in_output
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]) if prompt_token_ids else []
        self._context_text = self._decode(self._ids)
        if self._context_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character; such context would misalign the window.
            self._ids, self._context_text = [], ""
        self._read_offset = len(self._ids)
        self._decoded = ""  # all output text decoded so far, before stop truncation
        self._released = 0  # how much of _decoded has been handed out
        self._closed = False
        self.stop_matched: str | None = None
        # Tokens taken in, up to and including the one that completed a stop string:
        # a step that brought several (speculative decoding) keeps only these.
        self.num_tokens = 0

    @property
    def text(self) -> str:
        """All text released so far (the concatenation of the returned deltas)."""
        return self._decoded[:self._released]

    @property
    def finished(self) -> bool:
        """A stop string was matched; the text is final."""
        return self.stop_matched is not None

    def add_tokens(self, token_ids: Sequence[int]) -> str:
        if self._closed:
            raise RuntimeError("add_tokens() after flush(): the sequence's text is already final")
        if self.finished:
            return ""
        searched = len(self._decoded)
        for token_id in token_ids:
            self._decoded += self._step(token_id)
            self.num_tokens += 1
            if self._stop and self._find_stop(searched) is not None:
                break  # the tokens after a stop string are not the sequence's
        return self._release(searched, hold_back=True)

    def flush(self) -> str:
        """The sequence ended: release what was held back (an incomplete character shows as U+FFFD)."""
        if self._closed:
            raise RuntimeError("flush() was already called")
        self._closed = True
        if self.finished:
            return ""
        searched = len(self._decoded)
        if self._read_offset < len(self._ids):
            self._decoded += self._decode(self._ids)[len(self._context_text):]
        return self._release(searched, hold_back=False)

    # -- decoding --------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _step(self, token_id: int) -> str:
        self._ids.append(token_id)
        window = self._decode(self._ids)
        if len(window) <= len(self._context_text) or window.endswith(_REPLACEMENT_CHAR):
            return ""  # nothing yet, or the last character is still incomplete
        new_text = window[len(self._context_text):]
        # The window slides: what was pending becomes the next step's context.
        del self._ids[:self._read_offset]
        self._read_offset = len(self._ids)
        self._context_text = self._decode(self._ids)
        return new_text

    # -- stop strings ------------------------------------------------------------

    def _release(self, searched: int, hold_back: bool) -> str:
        """Hand out decoded text up to a stop string, or up to a possible stop prefix."""
        match = self._find_stop(searched)
        if match is not None:
            start, stop = match
            self.stop_matched = stop
            end = start + len(stop) if self._include_stop else start
        else:
            end = len(self._decoded) - (self._stop_prefix_len() if hold_back else 0)
        delta = self._decoded[self._released:end]
        self._released = end
        return delta

    def _find_stop(self, searched: int) -> tuple[int, str] | None:
        """The stop string completed first in the text not yet searched.

        Matching by earliest end, then earliest start, gives the same answer
        however the text was split into tokens.
        """
        best: tuple[int, int, str] | None = None
        for stop in self._stop:
            start = self._decoded.find(stop, max(self._released, searched - len(stop) + 1))
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _stop_prefix_len(self) -> int:
        """Length of the longest unreleased tail that is a proper prefix of a stop string."""
        tail = self._decoded[self._released:]
        for length in range(min(len(tail), self._max_stop_len - 1), 0, -1):
            suffix = tail[-length:]
            if any(stop.startswith(suffix) for stop in self._stop):
                return length
        return 0
