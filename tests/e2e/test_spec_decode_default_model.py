"""N-gram speculative decoding on the default model's fast path: the same greedy text as
without it, alone, together and over HTTP, on requests that copy a passage (where the
drafts are right) and on open-ended ones (where they mostly are not)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server.conftest import LiveServer, start_server
from tokenloom import LLM, SamplingParams
from tokenloom.bench.text_prompts import copy_texts, open_texts

pytestmark = pytest.mark.slow

NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2,
         "disable_by_batch_size": None}
GREEDY = SamplingParams(temperature=0, max_tokens=64)
CONVERSATIONS = [[{"role": "user", "content": text}] for text in copy_texts(6, seed=1) + open_texts(2, seed=1)]


def _answers(llm: LLM, conversations=CONVERSATIONS) -> list[tuple[str, int]]:
    """(text, tokens) of each greedy answer."""
    return [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in llm.chat(conversations, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def plain_answers(default_model_path) -> list[tuple[str, int]]:
    llm = LLM(str(default_model_path), kv_cache_memory=0.25)
    assert llm.engine.runner.model.ops.name == "native"  # the fast path under test
    return [_answers(llm, [c])[0] for c in CONVERSATIONS]  # each alone


@pytest.fixture(scope="module")
def ngram_llm(default_model_path) -> LLM:
    return LLM(str(default_model_path), kv_cache_memory=0.25, speculative_config=NGRAM)


def test_together_with_drafts_equals_alone_without(ngram_llm, plain_answers):
    assert _answers(ngram_llm) == plain_answers
    s = ngram_llm.engine.stats.snapshot()
    assert s.spec_decode_accepted_tokens_total > s.spec_decode_draft_tokens_total / 3 > 0


def test_chunked_prompts_with_drafts_equal_alone_without(default_model_path, plain_answers):
    llm = LLM(str(default_model_path), kv_cache_memory=0.25, speculative_config=NGRAM, max_num_batched_tokens=61)
    assert _answers(llm) == plain_answers


@pytest.fixture(scope="module")
def server(ngram_llm, plain_answers) -> Iterator[LiveServer]:
    live = start_server(ngram_llm.engine, model_name="smollm2-135m")
    yield live
    live.stop()


def test_concurrent_requests_over_http_equal_their_solo_answers(server, plain_answers):
    client = server.client()

    def chat(conversation) -> tuple[str, int]:
        resp = client.chat.completions.create(model="smollm2-135m", messages=conversation, temperature=0,
                                              max_tokens=64)
        return resp.choices[0].message.content, resp.usage.completion_tokens  # usage: the tokens sent

    with ThreadPoolExecutor(len(CONVERSATIONS)) as pool:
        assert list(pool.map(chat, CONVERSATIONS)) == plain_answers
    server.wait_idle()
    metrics = server.metrics()
    assert metrics["tokenloom:spec_decode_draft_tokens_total"] >= metrics["tokenloom:spec_decode_accepted_tokens_total"] > 0
