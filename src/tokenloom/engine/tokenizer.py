"""Tokenizer: text <-> token ids for one model, plus its chat template.

The tokenization itself is HF's Rust ``tokenizers`` library; this class only
knows where a model keeps its tokenizer (a GGUF file's metadata or a Hugging
Face directory) and the model's conventions around it: whether a BOS token is
prepended, which ids end generation, and how a conversation is rendered.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer

from tokenloom.engine.chat_template import Message, render_chat_template
from tokenloom.engine.gguf_tokenizer import (
    SPIECE_SPACE,
    build_backend,
    default_add_bos_token,
    read_gguf_tokenizer_metadata,
)
from tokenloom.gguf_file import GGUFFile


@dataclass(frozen=True, slots=True)
class SpecialTokens:
    """A model's conventions around its vocabulary."""

    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # any of these ends generation; the first is "the" EOS
    add_bos_token: bool
    add_eos_token: bool
    # Names the chat template sees (bos_token, eos_token, unk_token, pad_token).
    template_tokens: Mapping[str, str]


class Tokenizer:
    """One model's tokenizer.

    ``encode`` adds the model's BOS (and EOS) only when the model asks for it
    and never twice: text that already starts with the BOS token (as rendered
    chat templates often do) gets no second one. Special tokens written in the
    text (``<|im_start|>``) are recognised as such.
    """

    def __init__(self, backend: BackendTokenizer, special: SpecialTokens, chat_template: str | None,
                 vocab_size: int | None = None) -> None:
        self.backend = backend
        self._special = special
        self.chat_template = chat_template
        self._vocab_size = vocab_size if vocab_size is not None else backend.get_vocab_size(with_added_tokens=True)

    # -- loading -----------------------------------------------------------

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """From a ``.gguf`` file or a Hugging Face model directory."""
        path = Path(path)
        if path.is_dir():
            return cls.from_hf_dir(path)
        if path.is_file() and path.suffix == ".gguf":
            return cls.from_gguf(path)
        raise ValueError(f"{path} is neither a .gguf file nor a Hugging Face model directory")

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        return cls.from_gguf_file(GGUFFile(path))

    @classmethod
    def from_gguf_file(cls, file: GGUFFile) -> Tokenizer:
        """From an already opened GGUF file (saves a second parse when the weights loader has one)."""
        meta = read_gguf_tokenizer_metadata(file.fields)
        eos_ids = tuple(dict.fromkeys(
            i for i in (meta.eos_token_id, meta.eot_token_id, meta.eom_token_id) if i is not None))
        named = {"bos_token": meta.bos_token_id, "eos_token": meta.eos_token_id,
                 "unk_token": meta.unk_token_id, "pad_token": meta.pad_token_id}
        template_tokens = {name: meta.tokens[i] for name, i in named.items() if meta.token_or_none(i) is not None}
        special = SpecialTokens(
            bos_token_id=meta.bos_token_id,
            eos_token_ids=eos_ids,
            add_bos_token=default_add_bos_token(meta),
            add_eos_token=bool(meta.add_eos_token),
            template_tokens=template_tokens,
        )
        return cls(build_backend(meta), special, meta.chat_template, vocab_size=len(meta.tokens))

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> Tokenizer:
        """From ``tokenizer.json`` (+ ``tokenizer_config.json``, ``generation_config.json``,
        ``chat_template.jinja`` where present)."""
        directory = Path(directory)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"{directory} has no tokenizer.json")
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        config = _read_json(directory / "tokenizer_config.json")
        generation = _read_json(directory / "generation_config.json")
        special = _hf_special_tokens(backend, config, generation)
        return cls(backend, special, _hf_chat_template(directory, config))

    # -- vocabulary ----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._special.bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._special.eos_token_ids

    @property
    def add_bos_token(self) -> bool:
        return self._special.add_bos_token

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry (e.g. ``"Ġhello"``, ``"▁hello"``), not its text."""
        token = self.backend.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is out of vocabulary (size {self.vocab_size})")
        return token

    # -- text ----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if not add_special_tokens:
            return ids
        special = self._special
        if special.add_bos_token and special.bos_token_id is not None and ids[:1] != [special.bos_token_id]:
            ids.insert(0, special.bos_token_id)
        if special.add_eos_token and special.eos_token_ids and ids[-1:] != [special.eos_token_ids[0]]:
            ids.append(special.eos_token_ids[0])
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_token(self, token_id: int) -> str:
        """One token's text on its own (for logprobs); a piece of a UTF-8 character shows as U+FFFD."""
        text = self.backend.decode([token_id], skip_special_tokens=False)
        # SentencePiece decoders strip the space of the first token of a text;
        # a lone token is not at the start of anything, so it keeps its space.
        token = self.backend.id_to_token(token_id) or ""
        if token.startswith(SPIECE_SPACE) and not text.startswith(" "):
            text = " " + text
        return text

    # -- chat ----------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True, *,
                            chat_template: str | None = None, **extra: object) -> str:
        """The conversation rendered to prompt text; raises ChatTemplateError (a ValueError).

        ``chat_template`` replaces the model's own; ``extra`` become template
        variables (``tools``, ``documents``, ``enable_thinking`` ...).
        """
        source = chat_template if chat_template is not None else self.chat_template
        return render_chat_template(source, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self._special.template_tokens, **extra)

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True, *,
                    chat_template: str | None = None, **extra: object) -> list[int]:
        """Prompt ids of a conversation; a BOS the template writes is not added again."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt,
                                                    chat_template=chat_template, **extra))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: object) -> str | None:
    # tokenizer_config.json spells a token as a string or as an AddedToken dict.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_special_tokens(backend: BackendTokenizer, config: dict, generation: dict) -> SpecialTokens:
    template_tokens = {name: content for name in ("bos_token", "eos_token", "unk_token", "pad_token")
                       if (content := _token_content(config.get(name))) is not None}
    bos_id = _token_id(backend, template_tokens.get("bos_token"))
    eos_id = _token_id(backend, template_tokens.get("eos_token"))
    generation_eos = generation.get("eos_token_id", [])
    generation_eos = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos)
    if bos_id is None and isinstance(generation.get("bos_token_id"), int):
        bos_id = generation["bos_token_id"]
    eos_ids = tuple(dict.fromkeys(([eos_id] if eos_id is not None else []) + generation_eos))
    probe_bos, probe_eos = _post_processor_adds(backend, bos_id, eos_ids[0] if eos_ids else None)
    return SpecialTokens(
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        add_bos_token=bool(config.get("add_bos_token", probe_bos)),
        add_eos_token=bool(config.get("add_eos_token", probe_eos)),
        template_tokens=template_tokens,
    )


def _token_id(backend: BackendTokenizer, content: str | None) -> int | None:
    return None if content is None else backend.token_to_id(content)


def _post_processor_adds(backend: BackendTokenizer, bos_id: int | None, eos_id: int | None) -> tuple[bool, bool]:
    """Whether tokenizer.json's post-processor adds BOS / EOS (when the config does not say).

    ``encode`` adds them itself, so that it can avoid adding them twice.
    """
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    adds_bos = bos_id is not None and full[:1] == [bos_id] and plain[:1] != [bos_id]
    adds_eos = eos_id is not None and full[-1:] == [eos_id] and plain[-1:] != [eos_id]
    return adds_bos, adds_eos


def _hf_chat_template(directory: Path, config: dict) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        # Named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None
