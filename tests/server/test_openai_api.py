"""The OpenAI API over HTTP with the official client, checked against the offline LLM."""

from __future__ import annotations

import httpx
import pytest

from tokenloom import SamplingParams, __version__

GREEDY = {"temperature": 0, "max_tokens": 12}
NO_EOS = {"extra_body": {"ignore_eos": True}}
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about the river."}]


def offline(llm, prompt, **params):
    return llm.generate(prompt, SamplingParams(**params), use_tqdm=False)[0]


def engine_cached_tokens(engine, request_id: str, prompt_ids: list[int]) -> int:
    """RequestOutput.num_cached_tokens straight from an engine."""
    engine.add_request(request_id, prompt_ids, SamplingParams(temperature=0, max_tokens=2))
    cached = []
    while engine.has_unfinished_requests():
        cached += [out.num_cached_tokens for out in engine.step()]
    return cached[-1]


def test_models_lists_the_served_model(tiny_server):
    [card] = tiny_server.client().models.list().data
    assert card.id == "tiny"
    assert card.max_model_len == 512


def test_chat_greedy_equals_offline_with_exact_usage(tiny_server, tiny_llm):
    resp = tiny_server.client().chat.completions.create(model="tiny", messages=CHAT, **GREEDY, **NO_EOS)
    ref = tiny_llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    [choice] = resp.choices
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.outputs[0].text
    assert choice.finish_reason == "length"
    prompt_tokens = len(tiny_llm.tokenizer.encode_chat(CHAT))
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == \
        (prompt_tokens, 12, prompt_tokens + 12)


def test_cached_tokens_come_from_the_engine(tiny_server, tiny_llm):
    """A repeated conversation reuses its prompt's KV; usage reports what the engine reports."""
    messages = [{"role": "user", "content": "Scientists measure temperature, pressure and velocity carefully."}]
    client = tiny_server.client()
    prompt_ids = tiny_llm.tokenizer.encode_chat(messages)
    offline_runs = [engine_cached_tokens(tiny_llm.engine, f"cache-probe-{i}", prompt_ids) for i in range(2)]
    http_runs = [client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=2)
                 .usage.prompt_tokens_details.cached_tokens for _ in range(2)]
    assert http_runs[1] == offline_runs[1]


def test_chat_stream_equals_non_stream(tiny_server):
    client = tiny_server.client()
    whole = client.chat.completions.create(model="tiny", messages=CHAT, **GREEDY, **NO_EOS)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY, **NO_EOS))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_greedy_equals_offline_with_exact_usage(tiny_server, tiny_llm):
    prompt = "The river wound slowly through the valley"
    resp = tiny_server.client().completions.create(model="tiny", prompt=prompt, **GREEDY, **NO_EOS)
    ref = offline(tiny_llm, prompt, temperature=0, max_tokens=12, ignore_eos=True)
    assert resp.choices[0].text == ref.outputs[0].text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(tiny_llm.tokenizer.encode(prompt))
    assert resp.usage.completion_tokens == 12


def test_completion_stream_and_token_prompt_agree(tiny_server, tiny_llm):
    client = tiny_server.client()
    prompt = "Winter arrived early that year."
    ids = tiny_llm.tokenizer.encode(prompt)
    whole = client.completions.create(model="tiny", prompt=prompt, **GREEDY, **NO_EOS)
    from_ids = client.completions.create(model="tiny", prompt=ids, **GREEDY, **NO_EOS)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, stream=True, **GREEDY, **NO_EOS))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert from_ids.choices[0].text == whole.choices[0].text
    assert from_ids.usage.prompt_tokens == len(ids)


def test_list_of_prompts_numbers_choices_by_prompt(tiny_server, tiny_llm):
    prompts = ["The cat sat", "def add(a, b):"]
    resp = tiny_server.client().completions.create(model="tiny", prompt=prompts, n=2, seed=5, temperature=1,
                                                   max_tokens=6, **NO_EOS)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        ref = offline(tiny_llm, prompt, n=2, seed=5, temperature=1, max_tokens=6, ignore_eos=True)
        assert [c.text for c in resp.choices[2 * i:2 * i + 2]] == [o.text for o in ref.outputs]
    assert resp.usage.completion_tokens == 4 * 6
    assert resp.usage.prompt_tokens == sum(len(tiny_llm.tokenizer.encode(p)) for p in prompts)


def test_n2_stream_and_non_stream_match_offline(tiny_server, tiny_llm):
    client = tiny_server.client()
    params = {"n": 2, "seed": 11, "temperature": 1.0, "max_tokens": 8}
    resp = client.chat.completions.create(model="tiny", messages=CHAT, **params, **NO_EOS)
    ref = tiny_llm.chat(CHAT, SamplingParams(**params, ignore_eos=True), use_tqdm=False)[0]
    assert [c.message.content for c in resp.choices] == [o.text for o in ref.outputs]
    assert resp.usage.completion_tokens == 16
    texts = ["", ""]
    for chunk in client.chat.completions.create(model="tiny", messages=CHAT, stream=True, **params, **NO_EOS):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [o.text for o in ref.outputs]


def test_seed_makes_sampling_reproducible(tiny_server):
    client = tiny_server.client()

    def sample(seed: int) -> str:
        resp = client.completions.create(model="tiny", prompt="Once upon a time", temperature=1.0, seed=seed,
                                         max_tokens=16, **NO_EOS)
        return resp.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


def test_max_tokens_ends_with_length(tiny_server):
    resp = tiny_server.client().completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0,
                                                   **NO_EOS)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 3


def test_max_tokens_defaults_to_the_rest_of_the_context(tiny_server, tiny_llm):
    prompt = "The quick brown fox"
    resp = tiny_server.client().completions.create(model="tiny", prompt=prompt, temperature=0, **NO_EOS)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 512 - len(tiny_llm.tokenizer.encode(prompt))


def test_stop_string_ends_the_text_before_it(tiny_server):
    client = tiny_server.client()
    prompt = "The river wound slowly"
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                     **NO_EOS).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3 and stop in full
    cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=[stop],
                                    **NO_EOS).choices[0]
    assert cut.text == full[:full.index(stop)]
    assert cut.finish_reason == "stop"
    assert cut.model_extra["stop_reason"] == stop
    kept = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == full[:full.index(stop) + len(stop)]


def test_chat_logprobs_match_offline(tiny_server, tiny_llm):
    resp = tiny_server.client().chat.completions.create(model="tiny", messages=CHAT, logprobs=True, top_logprobs=3,
                                                        **GREEDY, **NO_EOS)
    ref = tiny_llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3),
                        use_tqdm=False)[0].outputs[0]
    content = resp.choices[0].logprobs.content
    assert len(content) == 12
    for entry, token_id, expected in zip(content, ref.token_ids, ref.logprobs):
        assert entry.token == tiny_llm.tokenizer.decode_token(token_id)
        assert entry.logprob == pytest.approx(expected[token_id].logprob, abs=1e-5)
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)  # greedy picks the top
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)


def test_completion_echo_with_logprobs(tiny_server, tiny_llm):
    prompt = "The cat sat on the mat"
    prompt_ids = tiny_llm.tokenizer.encode(prompt)
    resp = tiny_server.client().completions.create(model="tiny", prompt=prompt, echo=True, logprobs=2,
                                                   max_tokens=4, temperature=0, **NO_EOS)
    ref = offline(tiny_llm, prompt, temperature=0, max_tokens=4, ignore_eos=True)
    choice = resp.choices[0]
    assert choice.text == prompt + ref.outputs[0].text
    lp = choice.logprobs
    assert len(lp.tokens) == len(prompt_ids) + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens[:len(prompt_ids)]) == prompt
    assert lp.text_offset[:len(prompt_ids)] == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(prompt_ids))]
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    streamed = list(tiny_server.client().completions.create(model="tiny", prompt=prompt, echo=True, max_tokens=4,
                                                            temperature=0, stream=True, **NO_EOS))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


def test_tokenize_and_detokenize(tiny_server, tiny_llm):
    url = tiny_server.url
    text = "The river wound slowly"
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": text}).json()
    assert tokens == {"count": len(tiny_llm.tokenizer.encode(text)), "max_model_len": 512,
                      "tokens": tiny_llm.tokenizer.encode(text)}
    chat = httpx.post(f"{url}/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == tiny_llm.tokenizer.encode_chat(CHAT)
    assert httpx.post(f"{url}/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": text}


def test_health_version_and_metrics(tiny_server):
    url = tiny_server.url
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/version").json() == {"version": __version__}
    before = tiny_server.metrics()
    tiny_server.client().completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0, **NO_EOS)
    after = tiny_server.metrics()
    assert after["tokenloom:generation_tokens_total"] - before["tokenloom:generation_tokens_total"] == 5
    assert after["tokenloom:e2e_request_latency_seconds_count"] - \
        before["tokenloom:e2e_request_latency_seconds_count"] == 1
    assert after["tokenloom:time_to_first_token_seconds_count"] - \
        before["tokenloom:time_to_first_token_seconds_count"] == 1
    assert after["tokenloom:inter_token_latency_seconds_count"] - \
        before["tokenloom:inter_token_latency_seconds_count"] == 4
    for name in ("tokenloom:num_requests_running", "tokenloom:num_requests_waiting", "tokenloom:kv_cache_usage_perc",
                 "tokenloom:prompt_tokens_total", "tokenloom:num_preemptions_total",
                 "tokenloom:prefix_cache_queries_total", "tokenloom:prefix_cache_hits_total"):
        assert name in after
    tiny_server.wait_idle()
