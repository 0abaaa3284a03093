"""Structured output over HTTP with the official client: response_format and vLLM's
structured_outputs on chat and completions, streamed and not; bad specs are 400s that
name the field and leave the server healthy; many constrained and free requests at once."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest

CHAT = [{"role": "user", "content": "Tell me about a person."}]
PERSON = {
    "type": "object",
    "properties": {"name": {"enum": ["Ada", "Alan"]}, "age": {"type": "integer", "minimum": 1, "maximum": 99},
                   "ok": {"type": "boolean"}},
    "required": ["name", "age", "ok"], "additionalProperties": False,
}
MAX_TOKENS = 400  # the tiny random model pads JSON with whitespace; the grammar caps each run


def json_schema_format(schema: dict, name: str = "person") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def stream_text(stream) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += getattr(choice, "delta", None) and (choice.delta.content or "") or getattr(choice, "text", "")
            finish = choice.finish_reason or finish
    return text, finish


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_is_valid(tiny_server, stream):
    client = tiny_server.client()
    resp = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0.8,
                                          seed=5, response_format=json_schema_format(PERSON), stream=stream)
    text, finish = stream_text(resp) if stream else (resp.choices[0].message.content, resp.choices[0].finish_reason)
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_response_format_json_object_and_text(tiny_server):
    client = tiny_server.client()
    resp = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                          response_format={"type": "json_object"})
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(resp.choices[0].message.content), dict)
    else:  # a random model may not close its object in time, but it opened one
        assert resp.choices[0].message.content.lstrip().startswith("{")
    plain = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0,
                                           response_format={"type": "text"})
    free = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0)
    assert plain.choices[0].message.content == free.choices[0].message.content


@pytest.mark.parametrize("spec, check", [
    ({"regex": r"[a-c]{3}-[0-9]{2}"}, lambda t: re.fullmatch(r"[a-c]{3}-[0-9]{2}", t)),
    ({"choice": ["left", "right"]}, lambda t: t in ("left", "right")),
    ({"grammar": 'root ::= "n=" [0-9] [0-9]?'}, lambda t: re.fullmatch(r"n=[0-9]{1,2}", t)),
    ({"grammar": 'start: "v" /[0-9]/'}, lambda t: re.fullmatch(r"v[0-9]", t)),
    ({"json": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_structured_outputs_every_kind_on_both_endpoints(tiny_server, spec, check, endpoint):
    client = tiny_server.client()
    common = dict(model="tiny", max_tokens=MAX_TOKENS, temperature=1.0, seed=2, extra_body={"structured_outputs": spec})
    if endpoint == "chat":
        choice = client.chat.completions.create(messages=CHAT, **common).choices[0]
        text = choice.message.content
    else:
        choice = client.completions.create(prompt="Answer:", **common).choices[0]
        text = choice.text
    assert choice.finish_reason == "stop" and check(text), text


def test_streamed_structured_completion_equals_unstreamed(tiny_server):
    client = tiny_server.client()
    common = dict(model="tiny", prompt="Answer:", max_tokens=MAX_TOKENS, temperature=0,
                  extra_body={"structured_outputs": {"json": PERSON}})
    whole = client.completions.create(**common).choices[0].text
    text, finish = stream_text(client.completions.create(stream=True, **common))
    assert (text, finish) == (whole, "stop")


@pytest.mark.parametrize("body, param, words", [
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", ["regex"]),
    ({"structured_outputs": {"grammar": 'root ::= "a" | ('}}, "structured_outputs", ["grammar"]),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", ["choice"]),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", ["exactly one"]),
    ({"structured_outputs": {}}, "structured_outputs", ["exactly one"]),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
     "structured_outputs", ["response_format"]),
    ({"response_format": json_schema_format({"type": "object", "properties": {"a": {"type": "wat"}}})},
     "response_format", ["json"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", ["schema"]),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", ["required"]),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "x", "schema": {}}}},
     "response_format.json_schema", ["no other type"]),
    ({"response_format": {"type": "xml"}}, "response_format.type", []),
])
def test_bad_specs_are_400_naming_the_field_and_the_server_stays_healthy(tiny_server, body, param, words):
    for path, base in (("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": "x"})):
        resp = httpx.post(f"{tiny_server.url}{path}", json={**base, "max_tokens": 5, **body}, timeout=30)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == param, error
        for word in words:
            assert word in error["message"], error
    resp = httpx.post(f"{tiny_server.url}/v1/chat/completions", timeout=30,
                      json={"messages": CHAT, "max_tokens": 5, "stream": True, **body})
    assert resp.status_code == 400  # also before a stream opens
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200
    tiny_server.wait_idle()


def test_sixteen_concurrent_requests_each_valid_against_its_own_schema(tiny_server):
    def schema(i: int) -> dict:
        return {"type": "object", "properties": {f"k{i}": {"type": "integer", "minimum": i, "maximum": i + 5},
                                                 "tag": {"enum": [f"t{i}", f"u{i}"]}},
                "required": [f"k{i}", "tag"], "additionalProperties": False}

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, str, str]:
        kwargs = dict(model="tiny", messages=[{"role": "user", "content": f"item {i}"}], max_tokens=MAX_TOKENS,
                      temperature=1.0, seed=i, stream=True)
        if i % 4 != 3:
            kwargs["response_format"] = json_schema_format(schema(i), name=f"s{i}")
        else:
            kwargs["max_tokens"] = 12
        text, finish = "", None
        async for chunk in await client.chat.completions.create(**kwargs):
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return i, text, finish

    async def run_all():
        async with tiny_server.async_client(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    for i, text, finish in asyncio.run(run_all()):
        if i % 4 == 3:
            assert finish in ("stop", "length")
            continue
        assert finish == "stop", (i, text)
        jsonschema.validate(json.loads(text), schema(i))
    tiny_server.wait_idle()
