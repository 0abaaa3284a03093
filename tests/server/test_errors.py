"""Every refusal is a 4xx in OpenAI's shape naming the field, and none takes the server down."""

from __future__ import annotations

import httpx
import openai
import pytest

CHAT = [{"role": "user", "content": "hi"}]


def post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=30, **kwargs)


def assert_error(resp: httpx.Response, status: int, param: str | None, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    for word in words:
        assert word in error["message"]
    return error


@pytest.mark.parametrize("field, value", [
    ("functions", [{"name": "f"}]),
    ("function_call", "auto"),
    ("audio", {"voice": "alloy"}),
    ("modalities", ["text"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("store", True),
    ("metadata", {"a": "b"}),
    ("service_tier", "auto"),
    ("reasoning_effort", "low"),
    ("no_such_field", 1),
])
def test_unsupported_chat_fields_are_400_naming_them(tiny_server, field, value):
    resp = post(tiny_server, "/v1/chat/completions", json={"messages": CHAT, field: value})
    assert_error(resp, 400, field, field)


def test_unsupported_field_sent_as_null_means_absent(tiny_server):
    resp = post(tiny_server, "/v1/chat/completions", json={"messages": CHAT, "functions": None, "max_tokens": 2})
    assert resp.status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 500}}, "logit_bias"),
    ({"prompt": "x", "stop_token_ids": [100000]}, "stop_token_ids"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": [], "max_tokens": 1}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [100000]}, "prompt"),
    ({}, "prompt"),
])
def test_invalid_completion_values_are_400_naming_the_field(tiny_server, body, param):
    assert_error(post(tiny_server, "/v1/completions", json=body), 400, param)


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0.tool_calls"),
    ({"messages": CHAT, "tool_choice": "required"}, "tool_choice"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "bad name"}}]},
     "tools.0.function.name"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]}, "messages.0.tool_call_id"),
    ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": CHAT, "max_tokens": 3, "max_completion_tokens": 4}, "max_tokens"),
])
def test_invalid_chat_values_are_400_naming_the_field(tiny_server, body, param):
    assert_error(post(tiny_server, "/v1/chat/completions", json=body), 400, param)


def test_malformed_json_is_400(tiny_server):
    resp = post(tiny_server, "/v1/completions", content=b'{"prompt": "x",',
                headers={"content-type": "application/json"})
    assert_error(resp, 400, None, "Malformed JSON")


def test_unknown_model_is_404(tiny_server):
    error = assert_error(post(tiny_server, "/v1/completions", json={"model": "gpt-4", "prompt": "x"}),
                         404, "model", "gpt-4")
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        tiny_server.client().chat.completions.create(model="gpt-4", messages=CHAT)


def test_prompt_longer_than_the_context_states_both_numbers(tiny_server, tiny_llm):
    prompt = "one two three four five six seven eight nine ten " * 60
    num_tokens = len(tiny_llm.tokenizer.encode(prompt))
    assert num_tokens > 512
    assert_error(post(tiny_server, "/v1/completions", json={"prompt": prompt}), 400, "prompt",
                 str(num_tokens), "512")
    with pytest.raises(openai.BadRequestError) as info:
        tiny_server.client().completions.create(model="tiny", prompt=prompt)
    assert info.value.param == "prompt"


def test_max_tokens_beyond_the_context_states_the_numbers(tiny_server, tiny_llm):
    num_tokens = len(tiny_llm.tokenizer.encode("hello there"))
    assert_error(post(tiny_server, "/v1/completions", json={"prompt": "hello there", "max_tokens": 600}), 400,
                 "max_tokens", "600", "512", str(num_tokens), str(512 - num_tokens))


def test_unknown_route_is_404_in_openai_shape(tiny_server):
    assert_error(httpx.get(f"{tiny_server.url}/v1/nothing"), 404, None)


def test_server_still_serves_after_errors(tiny_server):
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200
    resp = tiny_server.client().completions.create(model="tiny", prompt="hello", max_tokens=2)
    assert resp.usage.completion_tokens >= 1
    tiny_server.wait_idle()
