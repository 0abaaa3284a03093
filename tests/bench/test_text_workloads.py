"""The copy and open workloads (speculative decoding): shipped passages, prompts, lengths."""

from __future__ import annotations

import random
import re
from importlib import resources

import pytest

from tokenloom.bench.serve import ServeTarget
from tokenloom.bench.text_prompts import (
    NUM_TYPOS,
    PASSAGES_RESOURCE,
    add_typos,
    copy_texts,
    load_passages,
    open_prompts,
    parse_passages,
)
from tokenloom.bench.workloads import WorkloadSpec, build_workload
from tokenloom.engine.tokenizer import Tokenizer
from tokenloom.model_files import SHAPES_DIR


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint) -> Tokenizer:
    return Tokenizer.from_path(tiny_checkpoint.hf_dir)


def _words(text: str) -> list[str]:
    return re.findall(r"\S+", text)


def _shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_the_passages_ship_in_the_package_and_parse():
    resource = resources.files("tokenloom.bench").joinpath(PASSAGES_RESOURCE)
    assert resource.is_file()
    passages = load_passages()
    assert passages == parse_passages(resource.read_text(encoding="utf-8"))
    assert 16 <= len(passages) <= 24
    assert len({p.text for p in passages}) == len(passages)
    code = [p for p in passages if p.is_code]
    assert 6 <= len(code) <= len(passages) - 6
    assert {"python", "c", "sql"} <= {p.language for p in code}
    for p in passages:
        assert re.search(rf"\b{re.escape(p.old)}\b", p.text) and p.old != p.new


def test_every_passage_is_100_to_250_tokens_of_the_default_models_tokenizer():
    default = Tokenizer.from_path(SHAPES_DIR)  # SmolLM2's tokenizer, shipped with the shapes
    lengths = [len(default.encode(p.text, add_special_tokens=False)) for p in load_passages()]
    assert all(100 <= n <= 250 for n in lengths), lengths


@pytest.mark.parametrize("header", ["@@ prose river", "@@ poem river stream", "@@ code river stream"])
def test_a_malformed_passage_header_is_refused(header):
    with pytest.raises(ValueError, match="bad passage header"):
        parse_passages(f"{header}\nThe river.\n")


def test_a_passage_without_its_word_to_replace_is_refused():
    with pytest.raises(ValueError, match="does not contain 'stream'"):
        parse_passages("@@ prose stream brook\nThe streams of the valley.\n")


@pytest.mark.parametrize("name", ["copy", "open"])
def test_the_same_seed_gives_the_same_requests_and_another_seed_does_not(tokenizer, name):
    spec = WorkloadSpec(name, 20, 256, 160, seed=4, endpoint="chat")
    first = build_workload(spec, tokenizer)
    assert first == build_workload(spec, tokenizer)
    other = build_workload(WorkloadSpec(name, 20, 256, 160, seed=5, endpoint="chat"), tokenizer)
    assert [r.text for r in other] != [r.text for r in first]


@pytest.mark.parametrize("name", ["copy", "open"])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_prompt_len_is_what_the_server_sees_and_input_len_does_not_apply(tokenizer, name, endpoint):
    requests = build_workload(WorkloadSpec(name, 12, 256, 160, seed=1, endpoint=endpoint), tokenizer)
    for r in requests:
        ids = tokenizer.encode_chat(r.messages()) if endpoint == "chat" else tokenizer.encode(r.completion_prompt())
        assert r.prompt_len == len(ids)
        assert (r.system, r.output_len) == (None, 160)
    assert len({r.prompt_len for r in requests}) > 1  # natural text: lengths vary
    other_input_len = build_workload(WorkloadSpec(name, 12, 32, 160, seed=1, endpoint=endpoint), tokenizer)
    assert other_input_len == requests


def test_copy_prompts_hold_a_passage_each_and_a_round_uses_every_passage_once():
    passages = load_passages()
    texts = copy_texts(2 * len(passages), seed=0)
    used = []
    for text in texts:
        if "typos" in text.split("\n\n")[0]:
            # The passage, with NUM_TYPOS words misspelt, ends the prompt.
            tail = [(p, _words(text)[-len(_words(p.text)):]) for p in passages]
            matches = [p for p, words in tail
                       if sum(a != b for a, b in zip(words, _words(p.text))) == NUM_TYPOS]
        else:
            matches = [p for p in passages if text.rstrip("`\n").endswith(p.text)]
        assert len(matches) == 1, text
        used.append(matches[0])
        instruction = text.split("\n\n")[0]
        if "renamed" in instruction or "replaced" in instruction:
            assert matches[0].old in instruction and matches[0].new in instruction
    assert set(used[:len(passages)]) == set(passages)
    assert set(used[len(passages):]) == set(passages)
    instructions = [t.split("\n\n")[0] for t in texts]
    for edit in ("verbatim", "typos", "replaced", "renamed", "Copy the following code"):
        assert any(edit in i for i in instructions), edit


def test_add_typos_swaps_neighbouring_inner_letters_in_distinct_words():
    text = load_passages()[0].text
    typoed = add_typos(text, random.Random(3))
    pairs = [(a, b) for a, b in zip(_words(text), _words(typoed)) if a != b]
    assert len(pairs) == NUM_TYPOS and len(_words(typoed)) == len(_words(text))
    for original, misspelt in pairs:
        assert sorted(original) == sorted(misspelt)
        assert (original[0], original[-1]) == (misspelt[0], misspelt[-1])
        diff = [i for i, (x, y) in enumerate(zip(original, misspelt)) if x != y]
        assert len(diff) == 2 and diff[1] == diff[0] + 1
    assert add_typos(text, random.Random(3)) == typoed


def test_open_prompts_are_short_distinct_and_share_nothing_with_the_passages(tokenizer):
    pool = open_prompts()
    assert len(set(pool)) == len(pool) >= 64
    passage_shingles = set().union(*(_shingles(p.text) for p in load_passages()))
    requests = build_workload(WorkloadSpec("open", len(pool), 256, 160, seed=2, endpoint="chat"), tokenizer)
    assert sorted(r.text for r in requests) == sorted(pool)  # one round: each prompt once
    for r in requests:
        assert not _shingles(r.text) & passage_shingles
        assert len(r.text.split()) <= 20


def test_force_output_none_sends_max_tokens_and_nothing_that_forces_the_length(tokenizer):
    [request] = build_workload(WorkloadSpec("copy", 1, 256, 160, endpoint="chat"), tokenizer)
    body = ServeTarget(base_url="http://x/v1", model="m", endpoint="chat", force_output="none").payload(request)
    assert body["max_tokens"] == 160 and body["temperature"] == 0.0
    assert "ignore_eos" not in body and "min_tokens" not in body
    assert body["messages"] == [{"role": "user", "content": request.text}]
    assert body["stream_options"] == {"include_usage": True}  # output counts come from usage
