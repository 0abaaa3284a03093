"""IncrementalDetokenizer: split characters, spacing, stop strings, special tokens."""

from __future__ import annotations

import pytest

from tests.helpers.tiny_tokenizer import (
    make_tiny_sentencepiece,
    make_tiny_tokenizer,
    save_hf_tokenizer,
    write_gguf_sentencepiece_metadata,
    write_tokenizer_gguf,
)
from tokenloom.engine.detokenizer import IncrementalDetokenizer
from tokenloom.engine.tokenizer import Tokenizer

RIVER = "The river wound slowly through the valley."
# The tiny vocabulary has no merges for these, so every character is split over 2-4 byte tokens.
MULTI_BYTE = "Hi 😀 中文 and é 👨‍👩‍👧!"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_path(save_hf_tokenizer(tmp_path_factory.mktemp("hf"), make_tiny_tokenizer(), None))


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    return Tokenizer.from_path(write_tokenizer_gguf(path, write_gguf_sentencepiece_metadata,
                                                    make_tiny_sentencepiece(), None))


def detok(tokenizer: Tokenizer, stop=(), skip_special_tokens=True, **kwargs) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens, stop=list(stop), **kwargs)


def feed_one_by_one(d: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [d.add_tokens([i]) for i in ids]


def test_river_tokens_are_as_the_stop_tests_assume(tok):
    tokens = [tok.id_to_token(i) for i in tok.encode(RIVER)]
    assert tokens[:8] == ["The", "Ġri", "ver", "Ġwou", "nd", "Ġs", "low", "ly"]


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece"])
def test_every_prefix_matches_one_shot_decode(tok, spm_tok, name):
    tokenizer = tok if name == "byte_level" else spm_tok
    ids = tokenizer.encode(MULTI_BYTE + " " + RIVER, add_special_tokens=False)
    assert len(ids) > 30
    for n in range(len(ids) + 1):
        d = detok(tokenizer)
        deltas = feed_one_by_one(d, ids[:n])
        assert not any("\ufffd" in delta for delta in deltas), deltas
        assert "".join(deltas) == d.text
        complete = tokenizer.decode(ids[:n])
        if name == "sentencepiece" and "\ufffd" in complete:
            # Cut inside a character, SentencePiece's byte fallback turns the whole
            # run of byte tokens into U+FFFD (complete characters included), so the
            # one-shot decode is no reference; the released text stays clean.
            assert "\ufffd" not in d.text
            assert d.flush().endswith("\ufffd")
            continue
        assert complete.startswith(d.text)
        assert d.text + d.flush() == complete


def test_split_characters_are_released_whole(tok):
    ids = tok.encode("é😀")
    assert len(ids) == 6
    assert feed_one_by_one(detok(tok), ids) == ["", "é", "", "", "", "😀"]


def test_chunked_feeding_gives_the_same_text(tok):
    ids = tok.encode(MULTI_BYTE + RIVER)
    for size in (2, 3, 7, len(ids)):
        d = detok(tok)
        deltas = [d.add_tokens(ids[i:i + size]) for i in range(0, len(ids), size)]
        assert "".join(deltas) + d.flush() == MULTI_BYTE + RIVER


def test_incomplete_character_at_the_end_is_flushed_as_replacement(tok):
    ids = tok.encode("ok 😀")[:-2]  # the emoji's last two bytes never arrive
    d = detok(tok)
    assert "".join(feed_one_by_one(d, ids)) == "ok "
    assert d.flush() == "\ufffd"
    assert d.text == tok.decode(ids)


def test_sentencepiece_prompt_context_keeps_the_first_space(spm_tok):
    prompt = spm_tok.encode("Hello")
    output = spm_tok.encode("Hello the river")[len(prompt):]
    assert [spm_tok.id_to_token(i) for i in output][:1] == ["▁the"]
    assert detok(spm_tok).add_tokens(output) == "the river"  # alone, a text's first space is stripped
    assert detok(spm_tok, prompt_token_ids=prompt).add_tokens(output) == " the river"


def test_stop_string_across_tokens_is_held_back_then_cut(tok):
    d = detok(tok, stop=["wound"])
    deltas = feed_one_by_one(d, tok.encode(RIVER)[:5])
    # " wou" could start "wound": only its space is released until "nd" decides.
    assert deltas == ["The", " ri", "ver", " ", ""]
    assert d.finished and d.stop_matched == "wound"
    assert d.text == "The river "
    assert d.add_tokens(tok.encode(" more")) == ""
    assert d.flush() == ""
    assert d.text == "The river "


def test_include_stop_str_in_output(tok):
    d = detok(tok, stop=["wound"], include_stop_str_in_output=True)
    assert feed_one_by_one(d, tok.encode(RIVER)[:6]) == ["The", " ri", "ver", " ", "wound", ""]
    assert d.text == "The river wound"


def test_stop_at_start(tok):
    for stop in ("The", "Th", "The river"):
        d = detok(tok, stop=[stop])
        assert "".join(feed_one_by_one(d, tok.encode(RIVER))) == ""
        assert d.finished and d.stop_matched == stop and d.text == ""


def test_false_start_is_released_when_disambiguated(tok):
    d = detok(tok, stop=["wound quickly"])
    assert feed_one_by_one(d, tok.encode(RIVER)[:6]) == ["The", " ri", "ver", " ", "", "wound s"]
    assert not d.finished


def test_flush_releases_held_back_text(tok):
    d = detok(tok, stop=["wound quickly"])
    assert "".join(feed_one_by_one(d, tok.encode(RIVER)[:5])) == "The river "
    assert d.flush() == "wound"
    assert d.text == "The river wound" and d.stop_matched is None
    with pytest.raises(RuntimeError):
        d.add_tokens([5])
    with pytest.raises(RuntimeError):
        d.flush()


@pytest.mark.parametrize(("stops", "text", "matched"), [
    (["wound slowly", "slow"], "The river wound ", "slow"),  # the one completed first wins
    (["slow", "wound slowly"], "The river wound ", "slow"),
    (["river wound", "wound"], "The ", "river wound"),  # same end: the longer (earlier start)
    (["wound", "river wound"], "The ", "river wound"),
    (["er w", "river"], "The ", "river"),
    (["valley.", "through the v"], "The river wound slowly ", "through the v"),
])
def test_overlapping_stops(tok, stops, text, matched):
    ids = tok.encode(RIVER)
    for size in (1, 4, len(ids)):  # the answer does not depend on how tokens arrive
        d = detok(tok, stop=stops)
        for i in range(0, len(ids), size):
            d.add_tokens(ids[i:i + size])
        d.flush()
        assert (d.text, d.stop_matched) == (text, matched), size


def test_stop_string_of_multi_byte_characters(tok):
    d = detok(tok, stop=["中文"])
    deltas = feed_one_by_one(d, tok.encode(MULTI_BYTE))
    assert not any("\ufffd" in delta for delta in deltas)
    assert d.text == "Hi 😀 " and d.stop_matched == "中文"


def test_skip_special_tokens(tok):
    ids = tok.encode("stop here<|im_end|> tail")
    assert 2 in ids
    skipped = detok(tok)
    assert "".join(feed_one_by_one(skipped, ids)) + skipped.flush() == "stop here tail"
    kept = detok(tok, skip_special_tokens=False)
    assert "".join(feed_one_by_one(kept, ids)) + kept.flush() == "stop here<|im_end|> tail"
    # A special token's text can be a stop string only when it is not skipped.
    stopped = detok(tok, stop=["<|im_end|>"], skip_special_tokens=False)
    feed_one_by_one(stopped, ids)
    assert stopped.text == "stop here" and stopped.finished
    not_stopped = detok(tok, stop=["<|im_end|>"])
    feed_one_by_one(not_stopped, ids)
    assert not not_stopped.finished


def test_empty_stop_string_is_rejected(tok):
    with pytest.raises(ValueError, match="non-empty"):
        detok(tok, stop=[""])
