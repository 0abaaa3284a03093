"""Build a ``tokenizers.Tokenizer`` from the ``tokenizer.ggml.*`` metadata of a GGUF file.

A GGUF carries no ``tokenizer.json``: llama.cpp stores the vocabulary, the
merges (or the SentencePiece scores) and the special token ids as metadata,
and names the pre-tokenizer regex by a short key (``tokenizer.ggml.pre``).
This module turns that back into HF's Rust tokenizer, following llama.cpp's
reading of the same keys, so that the text is split exactly the way the
model's vocabulary was learned.

Two vocabulary kinds (``tokenizer.ggml.model``):

    "gpt2"   byte-level BPE: tokens + merges, a pre-tokenizer regex per ``pre``
    "llama"  SentencePiece BPE: tokens + scores (merges are implied by the
             scores), "▁" for spaces, ``<0xNN>`` byte fallback
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

logger = logging.getLogger(__name__)

SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's visible space


class TokenType(enum.IntEnum):
    """llama.cpp's ``tokenizer.ggml.token_type`` values."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


_GPT2_PRES = frozenset({"default", "gpt2", "gpt-2", "phi-2", "roberta-bpe", "mpt", "olmo", "jais", "trillion"})
# These first isolate every digit, then apply GPT-2's regex (StarCoder's tokenizer family).
_DIGITS_THEN_GPT2_PRES = frozenset({"smollm", "starcoder", "refact", "codeshell", "command-r",
                                    "exaone", "minerva"})
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PRES = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"})
_QWEN2_PRES = frozenset({"qwen2", "deepseek-r1-qwen", "megrez"})
_SPLIT_REGEXES = {**{p: _LLAMA3_SPLIT for p in _LLAMA3_PRES}, **{p: _QWEN2_SPLIT for p in _QWEN2_PRES}}


@dataclass(frozen=True, slots=True)
class GGUFTokenizerMetadata:
    """The ``tokenizer.*`` keys of a GGUF file, as llama.cpp names them."""

    model: str
    pre: str | None
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    scores: tuple[float, ...]
    merges: tuple[str, ...]
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    eot_token_id: int | None = None
    eom_token_id: int | None = None
    unk_token_id: int | None = None
    pad_token_id: int | None = None
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def token_or_none(self, token_id: int | None) -> str | None:
        if token_id is None or not 0 <= token_id < len(self.tokens):
            return None
        return self.tokens[token_id]


def read_gguf_tokenizer_metadata(fields: Mapping[str, Any]) -> GGUFTokenizerMetadata:
    """From a GGUF file's metadata (``GGUFFile.fields``)."""

    def get(key: str, default=None):
        value = fields.get(key)
        return default if value is None else value

    model = get("tokenizer.ggml.model")
    if model is None:
        raise ValueError("the GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
    tokens = tuple(get("tokenizer.ggml.tokens", ()))
    return GGUFTokenizerMetadata(
        model=model,
        pre=get("tokenizer.ggml.pre"),
        tokens=tokens,
        token_types=tuple(get("tokenizer.ggml.token_type", ())) or (TokenType.NORMAL,) * len(tokens),
        scores=tuple(get("tokenizer.ggml.scores", ())),
        merges=tuple(get("tokenizer.ggml.merges", ())),
        bos_token_id=get("tokenizer.ggml.bos_token_id"),
        eos_token_id=get("tokenizer.ggml.eos_token_id"),
        eot_token_id=get("tokenizer.ggml.eot_token_id"),
        eom_token_id=get("tokenizer.ggml.eom_token_id"),
        unk_token_id=get("tokenizer.ggml.unknown_token_id"),
        pad_token_id=get("tokenizer.ggml.padding_token_id"),
        add_bos_token=get("tokenizer.ggml.add_bos_token"),
        add_eos_token=get("tokenizer.ggml.add_eos_token"),
        add_space_prefix=get("tokenizer.ggml.add_space_prefix"),
        chat_template=get("tokenizer.chat_template"),
    )


def default_add_bos_token(meta: GGUFTokenizerMetadata) -> bool:
    """llama.cpp's choice when the file does not say: SentencePiece and Llama 3 vocabularies want BOS."""
    if meta.add_bos_token is not None:
        return meta.add_bos_token
    return meta.model == "llama" or meta.pre in _LLAMA3_PRES


def build_backend(meta: GGUFTokenizerMetadata) -> BackendTokenizer:
    if meta.model == "gpt2":
        backend = _byte_level_backend(meta)
    elif meta.model == "llama":
        backend = _sentencepiece_backend(meta)
    else:
        raise ValueError(f"unsupported GGUF tokenizer model {meta.model!r} (supported: 'gpt2', 'llama')")
    _add_special_tokens(backend, meta)
    return backend


def _byte_level_backend(meta: GGUFTokenizerMetadata) -> BackendTokenizer:
    vocab = {token: i for i, token in enumerate(meta.tokens)}
    # Llama 3 vocabularies look a whole pre-token up before merging (llama.cpp's ignore_merges).
    bpe = models.BPE(vocab=vocab, merges=[_split_merge(m) for m in meta.merges],
                     ignore_merges=meta.pre in _LLAMA3_PRES)
    backend = BackendTokenizer(bpe)
    backend.pre_tokenizer = byte_level_pre_tokenizer(meta.pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _split_merge(merge: str) -> tuple[str, str]:
    # As llama.cpp does: the separator is the first space after the first character.
    cut = merge.find(" ", 1)
    if cut < 0:
        raise ValueError(f"malformed GGUF merge {merge!r}: expected 'left right'")
    return merge[:cut], merge[cut + 1:]


def byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The split llama.cpp applies for ``tokenizer.ggml.pre``, as an HF pre-tokenizer."""
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _SPLIT_REGEXES:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_REGEXES[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in _DIGITS_THEN_GPT2_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre is not None and pre not in _GPT2_PRES:
        logger.warning("unknown GGUF pre-tokenizer %r; falling back to GPT-2's split", pre)
    return gpt2


def _sentencepiece_backend(meta: GGUFTokenizerMetadata) -> BackendTokenizer:
    if len(meta.scores) != len(meta.tokens):
        raise ValueError("a 'llama' GGUF tokenizer needs one tokenizer.ggml.scores entry per token")
    vocab = {token: i for i, token in enumerate(meta.tokens)}
    bpe = models.BPE(vocab=vocab, merges=sentencepiece_merges(meta),
                     unk_token=meta.token_or_none(meta.unk_token_id), fuse_unk=True, byte_fallback=True)
    backend = BackendTokenizer(bpe)
    add_space_prefix = True if meta.add_space_prefix is None else meta.add_space_prefix
    # A normalizer (not Metaspace) so that, as in llama.cpp, the prefix space is
    # added to every text fragment between special tokens and is added even
    # when the text already starts with a space.
    to_spiece = normalizers.Replace(" ", SPIECE_SPACE)
    backend.normalizer = (normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), to_spiece])
                          if add_space_prefix else to_spiece)
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def sentencepiece_merges(meta: GGUFTokenizerMetadata) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies.

    SentencePiece BPE repeatedly joins the adjacent pair whose joined piece
    has the highest score; ranking every (left, right) split of every normal
    piece by that piece's score gives HF's BPE the same preference.
    """
    normal = {t for t, kind in zip(meta.tokens, meta.token_types) if kind == TokenType.NORMAL}
    ranked: list[tuple[float, int, int, str, str]] = []
    for token_id, (token, kind) in enumerate(zip(meta.tokens, meta.token_types)):
        if kind != TokenType.NORMAL or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-meta.scores[token_id], token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(backend: BackendTokenizer, meta: GGUFTokenizerMetadata) -> None:
    """Control/unknown tokens become special added tokens, user-defined ones plain added tokens.

    Either way llama.cpp matches them whole in the text; only special ones are
    dropped by ``skip_special_tokens``.
    """
    special, user_defined = [], []
    for token, kind in zip(meta.tokens, meta.token_types):
        if not token:
            continue
        if kind in (TokenType.CONTROL, TokenType.UNKNOWN):
            special.append(AddedToken(token, special=True, normalized=False))
        elif kind == TokenType.USER_DEFINED:
            user_defined.append(AddedToken(token, special=False, normalized=False))
    backend.add_special_tokens(special)
    backend.add_tokens(user_defined)
