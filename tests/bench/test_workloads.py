from __future__ import annotations

import pytest

from tokenloom.bench.workloads import (
    CHAT_MAX_FACTOR,
    WordSampler,
    WorkloadSpec,
    build_workload,
)
from tokenloom.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint) -> Tokenizer:
    return Tokenizer.from_path(tiny_checkpoint.hf_dir)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_random_prompts_have_the_exact_length_the_server_sees(tokenizer, endpoint):
    requests = build_workload(WorkloadSpec("random", 6, 40, 12, seed=3, endpoint=endpoint), tokenizer)
    assert [r.prompt_len for r in requests] == [40] * 6
    assert [r.output_len for r in requests] == [12] * 6
    for r in requests:
        ids = tokenizer.encode_chat(r.messages()) if endpoint == "chat" else tokenizer.encode(r.completion_prompt())
        assert len(ids) == 40
    assert len({r.text for r in requests}) == 6


def test_the_same_seed_gives_the_same_prompts_and_another_seed_does_not(tokenizer):
    spec = WorkloadSpec("chat", 5, 30, 10, seed=7)
    assert build_workload(spec, tokenizer) == build_workload(spec, tokenizer)
    other = build_workload(WorkloadSpec("chat", 5, 30, 10, seed=8), tokenizer)
    assert [r.text for r in other] != [r.text for r in build_workload(spec, tokenizer)]


def test_shared_prefix_requests_share_one_system_prompt(tokenizer):
    requests = build_workload(WorkloadSpec("shared-prefix", 4, 20, 8, seed=1, shared_prefix_len=50), tokenizer)
    assert len({r.system for r in requests}) == 1
    assert len(tokenizer.encode(requests[0].system, add_special_tokens=False)) == 50
    assert [r.prompt_len for r in requests] == [70] * 4
    assert len({r.text for r in requests}) == 4
    prefix_ids = tokenizer.encode(requests[0].system)
    for r in requests:
        assert tokenizer.encode(r.completion_prompt())[:len(prefix_ids)] == prefix_ids


def test_chat_lengths_vary_within_their_bounds_and_do_not_depend_on_the_endpoint(tokenizer):
    spec = WorkloadSpec("chat", 40, 32, 16, seed=2)
    completions = build_workload(spec, tokenizer)
    outputs = [r.output_len for r in completions]
    assert len(set(outputs)) > 5
    assert all(8 <= n <= CHAT_MAX_FACTOR * 16 for n in outputs)
    assert all(16 <= r.prompt_len <= CHAT_MAX_FACTOR * 32 for r in completions)
    chat = build_workload(WorkloadSpec("chat", 40, 32, 16, seed=2, endpoint="chat"), tokenizer)
    assert [r.output_len for r in chat] == outputs


def test_word_sampler_hits_the_requested_length(tokenizer):
    import random

    sampler = WordSampler(tokenizer, random.Random(0))
    for n in (1, 7, 64):
        assert len(tokenizer.encode(sampler.text(n), add_special_tokens=False)) == n


@pytest.mark.parametrize("spec", [WorkloadSpec("nope", 1, 1, 1), WorkloadSpec("random", 0, 1, 1),
                                  WorkloadSpec("shared-prefix", 1, 1, 1),
                                  WorkloadSpec("random", 1, 1, 1, endpoint="embeddings")])
def test_invalid_specs_are_refused(tokenizer, spec):
    with pytest.raises(ValueError):
        build_workload(spec, tokenizer)


def test_an_input_len_shorter_than_the_chat_template_is_refused(tokenizer):
    with pytest.raises(ValueError, match="leaves no room"):
        build_workload(WorkloadSpec("random", 1, 10, 4, endpoint="chat"), tokenizer)
