"""Tool calling over HTTP with the official client, on the tiny model whose ChatML template
knows no tools (so the generic Hermes prompt and parser are used): forced calls valid
against their schema, streamed deltas that assemble into the same calls, a full round
trip, tool_choice none/auto, and no call syntax in streamed content."""

from __future__ import annotations

import json

from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from tests.server.conftest import LiveServer, start_server
from tokenloom.engine.llm_engine import LLMEngine
from tokenloom.engine.tool_prompt import FunctionSpec, messages_for_generic_tools

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"]}
CLOCK = {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def long_context_checkpoint(tmp_path_factory) -> Path:
    """The tiny model with a 2048-token context: the tools prompt alone is ~600 of its tiny tokens."""
    from tests.helpers.tiny_models import make_tiny_model, save_hf_model
    from tests.helpers.tiny_tokenizer import CHATML_TEMPLATE, make_tiny_tokenizer

    hf = make_tiny_model("llama3", seed=1)
    hf.config.max_position_embeddings = 2048
    return save_hf_model(hf, tmp_path_factory.mktemp("tools") / "hf", tokenizer=make_tiny_tokenizer(512),
                         chat_template=CHATML_TEMPLATE)


def serve(checkpoint: Path, **server_options) -> LiveServer:
    return start_server(LLMEngine.from_options(str(checkpoint), num_kv_blocks=1024, block_size=4), **server_options)


@pytest.fixture(scope="module")
def tiny_server(long_context_checkpoint) -> Iterator[LiveServer]:
    live = serve(long_context_checkpoint)
    yield live
    live.stop()


def check_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, {**SCHEMAS[call.function.name], "additionalProperties": False})
    return arguments


def assemble(stream) -> tuple[str, list[dict], str | None, list]:
    """What an agent framework does with the deltas: content, calls by index, finish reason."""
    content, calls, finish, chunks = "", {}, None, []
    for chunk in stream:
        for choice in chunk.choices:
            chunks.append(choice.delta)
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                if d.index not in calls:
                    assert d.id and d.type == "function" and d.function.name  # the first delta of a call
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish, chunks


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_gives_valid_calls(tiny_server, seed):
    resp = tiny_server.client().chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        temperature=1.0, seed=seed, max_tokens=MAX_TOKENS)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0])


def test_named_function_is_the_one_called(tiny_server):
    resp = tiny_server.client().chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0, max_tokens=MAX_TOKENS)
    [call] = resp.choices[0].message.tool_calls
    assert call.function.name == "get_time" and resp.choices[0].finish_reason == "tool_calls"
    check_call(call)


def test_streamed_calls_assemble_to_the_unstreamed_ones(tiny_server):
    client = tiny_server.client()
    common = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0,
                  max_tokens=MAX_TOKENS)
    whole = client.chat.completions.create(**common).choices[0]
    content, calls, finish, chunks = assemble(client.chat.completions.create(stream=True, **common))
    assert content == "" and finish == whole.finish_reason
    assert [(c["name"], c["arguments"]) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert sum(1 for d in chunks if d.tool_calls) > len(calls)  # arguments came in fragments
    for call in calls:
        json.loads(call["arguments"])


def test_tool_round_trip(tiny_server):
    client = tiny_server.client()
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=MAX_TOKENS)
    [call] = first.choices[0].message.tool_calls
    conversation = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny", "high_c": 21})},
    ]
    answer = client.chat.completions.create(model="tiny", messages=conversation, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=8)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt
    tiny_server.wait_idle()


def test_round_trip_prompt_renders_the_call_and_the_result(tiny_server):
    tokenizer = tiny_server.engine.engine.tokenizer
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    functions = [FunctionSpec("get_time", None, CLOCK)]
    prompt = tokenizer.apply_chat_template(messages_for_generic_tools(messages, functions))
    assert '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>' in prompt
    assert "<tool_response>\n12:00\n</tool_response>" in prompt
    assert '"name": "get_time"' in prompt.split("<|im_start|>user")[0]  # the tools, in the system turn


def test_auto_parses_calls_the_model_writes_and_no_syntax_leaks_when_streamed(tiny_server):
    """tool_choice auto with a grammar that makes the tiny model write text, then a Hermes
    call: the tag arrives split over several tokens, and content never shows it."""
    text_then_call = ('start: "Let me check. " "<tool_call>\\n{\\"name\\": \\"get_time\\", '
                      '\\"arguments\\": {\\"tz\\": \\"CET\\"}}\\n</tool_call>"')
    client = tiny_server.client()
    common = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=MAX_TOKENS,
                  extra_body={"structured_outputs": {"grammar": text_then_call}})
    whole = client.chat.completions.create(**common).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Let me check."
    [call] = whole.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {"tz": "CET"})
    content, calls, finish, chunks = assemble(client.chat.completions.create(stream=True, **common))
    assert content.strip() == "Let me check." and "<" not in content
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_time", call.function.arguments)]
    assert finish == "tool_calls"
    tokenizer = tiny_server.engine.engine.tokenizer
    assert len(tokenizer.encode("<tool_call>", add_special_tokens=False)) > 1  # the tag really was split


def test_tool_choice_none_and_auto_without_a_call_answer_with_text(tiny_server):
    client = tiny_server.client()
    plain = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=6)
    for choice in ("none", "auto"):
        resp = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice,
                                              temperature=0, max_tokens=6)
        message = resp.choices[0].message
        assert message.tool_calls is None and message.content and resp.choices[0].finish_reason == "length"
        assert resp.usage.prompt_tokens > plain.usage.prompt_tokens  # the tools are in the prompt either way


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_calls_each_valid(tiny_server, stream):
    client = tiny_server.client()
    common = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=4,
                  max_tokens=MAX_TOKENS)
    if stream:
        _, assembled, finish, _ = assemble(client.chat.completions.create(stream=True, **common))
        calls = [(c["name"], c["arguments"]) for c in assembled]
    else:
        choice = client.chat.completions.create(**common).choices[0]
        finish = choice.finish_reason
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert calls and finish in ("tool_calls", "length")
    complete = calls if finish == "tool_calls" else calls[:-1]  # max_tokens may cut the last one
    for name, arguments in complete:
        jsonschema.validate(json.loads(arguments), {**SCHEMAS[name], "additionalProperties": False})
    tiny_server.wait_idle()


def test_llama3_json_parser_forces_and_reads_its_own_format(long_context_checkpoint):
    """--tool-call-parser llama3_json: a forced call is written as Llama 3's JSON object
    (with "parameters") and read back as a call."""
    live = serve(long_context_checkpoint, tool_call_parser="llama3_json")
    try:
        resp = live.client().chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
            temperature=0, max_tokens=MAX_TOKENS)
        live.wait_idle()
    finally:
        live.stop()
    [call] = resp.choices[0].message.tool_calls
    assert call.function.name == "get_time" and resp.choices[0].finish_reason == "tool_calls"
    check_call(call)
