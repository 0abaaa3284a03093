"""The default model (SmolLM2-135M-Instruct) over HTTP equals the offline LLM, token for token.

The model is loaded once: the offline ``LLM`` computes the references first,
then the server takes over its idle engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server.conftest import LiveServer, start_server
from tokenloom import LLM, RequestOutput, SamplingParams

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Water boils at"]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def llm(default_model_path) -> LLM:
    return LLM(str(default_model_path), dtype="float32", max_model_len=2048, kv_cache_memory=0.25)


@pytest.fixture(scope="module")
def references(llm) -> dict[str, list[RequestOutput]]:
    return {"chat": llm.chat(QUESTION, GREEDY, use_tqdm=False),
            "completions": llm.generate(PROMPTS, GREEDY, use_tqdm=False)}


# Prompts of many lengths, for batch invariance under concurrency.
CONCURRENT = [" ".join(["river light stone code", "model paper window", "garden music number"][i % 3]
                       for _ in range(1 + 7 * i)) + f" {i}." for i in range(12)]


@pytest.fixture(scope="module")
def solo(llm) -> list[str]:
    """Each CONCURRENT prompt's greedy text, computed alone."""
    return [llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].text for p in CONCURRENT]


@pytest.fixture(scope="module")
def server(llm, references, solo) -> Iterator[LiveServer]:
    live = start_server(llm.engine, model_name="smollm2-135m")  # the LLM is done with its engine
    yield live
    live.stop()


def test_chat_greedy_over_http_equals_offline(server, references):
    [ref] = references["chat"]
    client = server.client()
    resp = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, temperature=0, max_tokens=24)
    # No "Paris" check here: on this GGUF the fast path answers like llama.cpp does
    # ("L'Étoile, la Marseillaise, ..."); the exact path's answer is held to
    # transformers in tests/e2e/test_default_model.py.
    assert resp.choices[0].message.content == ref.outputs[0].text
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    streamed = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, temperature=0,
                                              max_tokens=24, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == ref.outputs[0].text


def test_completions_greedy_over_http_equal_offline(server, references):
    refs = references["completions"]
    resp = server.client().completions.create(model="smollm2-135m", prompt=PROMPTS, temperature=0, max_tokens=24)
    assert [c.text for c in resp.choices] == [r.outputs[0].text for r in refs]
    assert "100" in resp.choices[2].text  # "Water boils at" -> " 100°C": a working model, not two equal wrong ones
    assert [c.finish_reason for c in resp.choices] == [r.outputs[0].finish_reason for r in refs]
    server.wait_idle()


def test_concurrent_greedy_answers_equal_their_solo_ones(server, solo):
    """Batch invariance over HTTP: twelve requests at once (mixed prefill and decode steps,
    prompts chunked by the token budget) give each the text it got alone."""
    client = server.client()

    def complete(prompt: str) -> str:
        resp = client.completions.create(model="smollm2-135m", prompt=prompt, temperature=0, max_tokens=24)
        return resp.choices[0].text

    with ThreadPoolExecutor(len(CONCURRENT)) as pool:
        assert list(pool.map(complete, CONCURRENT)) == solo
    server.wait_idle()
