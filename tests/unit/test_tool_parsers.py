"""Tool-call parsing: whole responses, streams split anywhere, call grammars, and the generic tools prompt."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenloom.engine.tool_prompt import (
    FunctionSpec,
    messages_for_generic_tools,
    template_supports_tools,
    tools_system_prompt,
)
from tokenloom.entrypoints.openai.tool_parsers import (
    TOOL_PARSERS,
    ParsedMessage,
    ParsedToolCall,
    StreamDelta,
    ToolCallDelta,
    detect_tool_parser,
    get_tool_parser,
)

HERMES = get_tool_parser("hermes")
LLAMA = get_tool_parser("llama3_json")


def calls(*pairs: tuple[str, str], content: str | None = None) -> ParsedMessage:
    return ParsedMessage(content, tuple(ParsedToolCall(n, a) for n, a in pairs))


def text_only(text: str) -> tuple[str, ParsedMessage]:
    """A case whose text is all content."""
    return text, ParsedMessage(text, ())


def hermes_block(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


PARIS = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
PARIS_ARGS = '{"city": "Paris", "unit": "celsius"}'
TOKYO = '{"name": "get_weather", "arguments": {"city": "T\\u014dky\\u014d \\"east\\" {x}", "days": [1, 2]}}'
TOKYO_ARGS = '{"city": "T\\u014dky\\u014d \\"east\\" {x}", "days": [1, 2]}'

# (text, expected parse) for the Hermes format.
HERMES_CASES = [
    text_only("The weather in Paris is sunny."),
    text_only(""),
    text_only("  \n"),
    text_only("Use <toolbox> here."),
    text_only("ends with <tool_ca"),
    (hermes_block(PARIS), calls(("get_weather", PARIS_ARGS))),
    ("I'll check both.\n\n" + hermes_block(PARIS) + "\n" + hermes_block(TOKYO) + "\nDone, see above.",
     calls(("get_weather", PARIS_ARGS), ("get_weather", TOKYO_ARGS), content="I'll check both.")),
    ("  \n" + hermes_block('{"name": "now", "arguments": {}}'), calls(("now", "{}"))),
    # Not name-first, "parameters", arguments as a string, no arguments: judged whole.
    (hermes_block('{"arguments": {"q": "a}b"}, "name": "search"}'), calls(("search", '{"q": "a}b"}'))),
    (hermes_block('{"name": "search", "parameters": {"q": 1}}'), calls(("search", '{"q": 1}'))),
    (hermes_block('{"name": "search", "arguments": " {\\"q\\": 1} "}'), calls(("search", '{"q": 1}'))),
    (hermes_block('{"name": "now"}'), calls(("now", "{}"))),
    # No valid first call: all of it is content.
    text_only("Hmm.\n" + hermes_block("get_weather(city='Paris')") + " ok"),
    text_only(hermes_block('{"arguments": {"city": "Paris"}}')),
    text_only(hermes_block('{"name": 7, "arguments": {}}')),
    text_only(hermes_block('{"name": "f", "arguments": [1]}')),
    text_only(hermes_block('{"arguments": {}, "name": "f"} extra')),
    # A broken later block is dropped.
    (hermes_block(PARIS) + hermes_block("oops"), calls(("get_weather", PARIS_ARGS))),
    # Truncated (max_tokens) after the head: the call keeps the arguments text it got.
    ('Checking.\n<tool_call>\n{"name": "f", "arguments": {"a": [1, 2',
     calls(("f", '{"a": [1, 2'), content="Checking.")),
    # Truncated before the head: no call was made.
    text_only('Checking.\n<tool_call>\n{"name": "f", "argu'),
    # No end tag (a stop string, or EOS right after the object).
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}', calls(("f", '{"a": 1}'))),
    ('<tool_call>{"arguments": {"a": 1}, "name": "f"}', calls(("f", '{"a": 1}'))),
    # The end tag inside an argument string is argument text; outside it, it cuts the arguments short.
    (hermes_block('{"name": "f", "arguments": {"x": "</tool_call>"}}'), calls(("f", '{"x": "</tool_call>"}'))),
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1</tool_call>', calls(("f", '{"a": 1'))),
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1 </tool_', calls(("f", '{"a": 1 </tool_'))),
    # The model forgot </tool_call> before the next call.
    ('<tool_call>{"name": "f", "arguments": {}}\n<tool_call>{"name": "g", "arguments": {"b": "\\\\"}}',
     calls(("f", "{}"), ("g", '{"b": "\\\\"}'))),
]

LLAMA_CASES = [
    text_only("Paris is sunny."),
    text_only(""),
    text_only(" \n"),
    text_only('{"answer": 42}'),
    text_only('<|python_tag|>brave_search.call(query="x")'),
    text_only("<|python"),
    text_only('{"parameters": {"a": 1}, "name": "f"} trailing'),
    text_only('{"name": "f", "param'),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', calls(("get_weather", '{"city": "Paris"}'))),
    ('<|python_tag|>{"name": "f", "parameters": {"a": "}{"}}; {"name": "g", "arguments": {"b": [1]}};',
     calls(("f", '{"a": "}{"}'), ("g", '{"b": [1]}'))),
    ('\n {"parameters": {"a": 1}, "name": "f"} ;{"name": "g", "parameters": "{}"}',
     calls(("f", '{"a": 1}'), ("g", "{}"))),
    # After a committed call, text up to the next ";" and a later non-call are dropped.
    ('{"name": "f", "parameters": {}} and more', calls(("f", "{}"))),
    ('{"name": "f", "parameters": {"a": 1}}; {"oops": 1}', calls(("f", '{"a": 1}'))),
    ('{"name": "f", "parameters": {"a": 1}}; {"parameters": {}, "name": "g"}', calls(("f", '{"a": 1}'), ("g", "{}"))),
    # Truncated after the head.
    ('{"name": "f", "parameters": {"a": "x\\"', calls(("f", '{"a": "x\\"'))),
]


@pytest.mark.parametrize(("text", "expected"), HERMES_CASES)
def test_hermes_parse(text: str, expected: ParsedMessage) -> None:
    assert HERMES.parse(text) == expected


@pytest.mark.parametrize(("text", "expected"), LLAMA_CASES)
def test_llama3_json_parse(text: str, expected: ParsedMessage) -> None:
    assert LLAMA.parse(text) == expected


# -- streaming agrees with parse() for any split ----------------------------------


def stream(parser, pieces: list[str]) -> list[StreamDelta]:
    streamer = parser.streamer()
    return [streamer.feed(piece) for piece in pieces] + [streamer.finish()]


def assert_stream_agrees(parser, text: str, cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(text)]
    deltas = stream(parser, [text[a:b] for a, b in zip(bounds, bounds[1:])])
    expected = parser.parse(text)
    assert "".join(d.content for d in deltas) == (expected.content or "")
    names: list[str] = []
    arguments: list[str] = []
    for delta in (c for d in deltas for c in d.tool_calls):
        if delta.index == len(names):  # a new call: its first delta names it
            assert delta.name is not None
            names.append(delta.name)
            arguments.append(delta.arguments)
        else:
            assert delta.index == len(names) - 1 and delta.name is None
            arguments[-1] += delta.arguments
    assert [ParsedToolCall(n, a) for n, a in zip(names, arguments)] == list(expected.tool_calls)


ALL_CASES = [(HERMES, text) for text, _ in HERMES_CASES] + [(LLAMA, text) for text, _ in LLAMA_CASES]


@pytest.mark.parametrize(("parser", "text"), ALL_CASES)
def test_stream_agrees_with_parse_for_every_cut(parser, text: str) -> None:
    for cut in range(len(text) + 1):
        assert_stream_agrees(parser, text, [cut])
    assert_stream_agrees(parser, text, list(range(len(text))))  # one char at a time


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_stream_agrees_with_parse_for_random_splits(data) -> None:
    parser, text = data.draw(st.sampled_from(ALL_CASES))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert_stream_agrees(parser, text, cuts)


# Pieces of call syntax, so that random texts hit the parsers' corners.
FRAGMENTS = ["<tool_call>", "</tool_call>", "<tool_", "<|python_tag|>", '{"name": "f"', '{"name": "g", ',
             '"arguments": ', '"parameters": ', "{", "}", "[", "]", '"', '\\"', "\\", ",", ":", ";", " ", "\n",
             "x", "1", '"a"', '"}"']


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_stream_agrees_with_parse_on_random_texts(data) -> None:
    text = "".join(data.draw(st.lists(st.sampled_from(FRAGMENTS), max_size=20)))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
    for parser in (HERMES, LLAMA):
        assert_stream_agrees(parser, text, cuts)


def test_a_split_start_tag_is_held_back() -> None:
    streamer = HERMES.streamer()
    assert streamer.feed("Let me look. <tool_") == StreamDelta("Let me look.", ())
    first = streamer.feed('call>\n{"name": "get_weather", "arguments": {"ci')
    assert first.content == "" and first.tool_calls[0].name == "get_weather"
    assert first.tool_calls[0].arguments == '{"ci'
    assert streamer.feed('ty": "Paris"}}\n</tool_call>').tool_calls[0].arguments == 'ty": "Paris"}'
    assert streamer.finish() == StreamDelta("", ())


def test_a_false_start_tag_becomes_content() -> None:
    streamer = HERMES.streamer()
    assert streamer.feed("Open the <tool") == StreamDelta("Open the", ())
    assert streamer.feed("box> now") == StreamDelta(" <toolbox> now", ())
    assert streamer.finish() == StreamDelta("", ())


def test_arguments_stream_as_they_grow() -> None:
    streamer = LLAMA.streamer()
    assert streamer.feed('<|python_tag|>{"name": "f", ') == StreamDelta("", ())
    assert streamer.feed('"parameters": {"a"') == StreamDelta("", (ToolCallDelta(0, "f", '{"a"'),))
    assert streamer.feed(': "x}"') == StreamDelta("", (ToolCallDelta(0, None, ': "x}"'),))
    assert streamer.feed("}}") == StreamDelta("", (ToolCallDelta(0, None, "}"),))
    assert streamer.finish() == StreamDelta("", ())


# -- call grammars ---------------------------------------------------------------

WEATHER = FunctionSpec("get_weather", "Current weather.", {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"]})
ADD = FunctionSpec("add", None, {
    "type": "object", "properties": {"a": {"$ref": "#/$defs/num"}, "b": {"$ref": "#/$defs/num"}},
    "required": ["a", "b"], "additionalProperties": False, "$defs": {"num": {"type": "integer"}}})
NOW = FunctionSpec("now", None, {"type": "object", "properties": {}})
TOOLS = [WEATHER, ADD, NOW]

# Per tool: (name, arguments text the schema accepts).
GOOD_CALLS = [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Lyon", "unit": "celsius"}'),
              ("add", '{"a": 1, "b": 2}'), ("add", '{"a":1,"b":2}'), ("now", "{}")]
BAD_CALLS = [("get_time", "{}"), ("get_weather", '{"unit": "celsius"}'), ("get_weather", '{"city": 3}'),
             ("add", '{"a": 1, "b": 2, "c": 3}'), ("add", '{"a": 1.5, "b": 2}')]


def hermes_call(name: str, arguments: str) -> str:
    return hermes_block(f'{{"name": "{name}", "arguments": {arguments}}}')


def llama_call(name: str, arguments: str) -> str:
    return f'{{"name": "{name}", "parameters": {arguments}}}'


FORMATS = [(HERMES, hermes_call, "\n"), (LLAMA, llama_call, "; ")]


@pytest.fixture(scope="module")
def matcher_factory(default_model_path):
    llg = pytest.importorskip("llguidance")
    from tokenloom.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(default_model_path)
    lltok = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=49152, eos_token=[2])

    def consume(grammar: str, text: str) -> bool:
        compiled = llg.LLMatcher.grammar_from_lark(grammar)
        assert llg.LLMatcher.validate_grammar(compiled, lltok) == ""
        matcher = llg.LLMatcher(lltok, compiled)
        ids = tokenizer.encode(text, add_special_tokens=False)
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()

    return consume


@pytest.mark.slow
@pytest.mark.parametrize(("parser", "render", "separator"), FORMATS)
def test_call_grammar_accepts_valid_calls(matcher_factory, parser, render, separator) -> None:
    grammar = parser.call_grammar(TOOLS, parallel=False)
    for name, arguments in GOOD_CALLS:
        text = render(name, arguments)
        assert matcher_factory(grammar, text), text
        assert parser.parse(text) == calls((name, arguments))
    one = parser.call_grammar([WEATHER], parallel=False)
    assert matcher_factory(one, render("get_weather", '{"city": "Paris"}'))
    assert not matcher_factory(one, render("now", "{}"))


@pytest.mark.slow
@pytest.mark.parametrize(("parser", "render", "separator"), FORMATS)
def test_call_grammar_rejects_invalid_calls(matcher_factory, parser, render, separator) -> None:
    grammar = parser.call_grammar(TOOLS, parallel=True)
    for name, arguments in BAD_CALLS:
        assert not matcher_factory(grammar, render(name, arguments)), (name, arguments)
    padded = render("now", "{}").replace('"now",', '"now",\n\n   ')  # no unbounded whitespace
    name_last = render("now", "{}").replace('"name": "now", ', "").replace("{}}", '{}, "name": "now"}')
    assert parser.parse(name_last) == calls(("now", "{}"))  # the parser takes it, the grammar wants the name first
    assert not matcher_factory(grammar, name_last)
    assert not matcher_factory(grammar, padded)
    two = render("now", "{}") + separator + render("add", '{"a": 1, "b": 2}')
    assert not matcher_factory(parser.call_grammar(TOOLS, parallel=False), two)


@pytest.mark.slow
@pytest.mark.parametrize(("parser", "render", "separator"), FORMATS)
def test_parallel_call_grammar(matcher_factory, parser, render, separator) -> None:
    grammar = parser.call_grammar(TOOLS, parallel=True)
    text = separator.join(render(name, arguments) for name, arguments in GOOD_CALLS)
    assert matcher_factory(grammar, text)
    assert parser.parse(text) == calls(*GOOD_CALLS)


def test_call_grammar_needs_tools() -> None:
    with pytest.raises(ValueError):
        HERMES.call_grammar([], parallel=False)


# -- choosing a parser ------------------------------------------------------------


def test_get_tool_parser() -> None:
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json"}
    assert get_tool_parser("hermes").name == "hermes"
    with pytest.raises(ValueError, match="hermes, llama3_json"):
        get_tool_parser("mistral")


@pytest.mark.parametrize(("template", "expected"), [
    (None, "hermes"),
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}", "hermes"),
    ("{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}<tool_call>", "hermes"),
    ("{%- if message.role == 'ipython' %}<|start_header_id|>ipython<|end_header_id|>{% endif %}", "llama3_json"),
    ("{{- '<|python_tag|>' + tool_call.name }}", "llama3_json"),
])
def test_detect_tool_parser(template: str | None, expected: str) -> None:
    assert detect_tool_parser(template) == expected


# -- the generic tools prompt -----------------------------------------------------

EXPECTED_PROMPT = (
    "# Tools\n\n"
    "You may call one or more functions to help with the user's request. The functions you can call are "
    "described below, one JSON object per line, between <tools> and </tools>:\n"
    "<tools>\n"
    '{"name": "get_weather", "description": "Current weather.", "parameters": {"type": "object", "properties": '
    '{"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}\n'
    '{"name": "now", "parameters": {"type": "object", "properties": {}}}\n'
    "</tools>\n\n"
    "To call a function, write its name and arguments as a JSON object between <tool_call> and </tool_call>, "
    "one block per call:\n"
    "<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>\n"
    "Each result comes back to you between <tool_response> and </tool_response>."
)


def test_tools_system_prompt() -> None:
    assert tools_system_prompt([WEATHER, NOW]) == EXPECTED_PROMPT


def test_template_supports_tools() -> None:
    assert template_supports_tools("{%- if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}")
    assert not template_supports_tools("{{ 'no tools here' }}{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not template_supports_tools(None)
    assert not template_supports_tools("{% if %}")  # broken: treated as not reading tools


CONVERSATION = [
    {"role": "user", "content": "Weather in Paris and Lyon?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18C"},
    {"role": "tool", "tool_call_id": "c2", "content": "20C"},
    {"role": "assistant", "content": "Checking the time too.", "tool_calls": [
        {"id": "c3", "type": "function", "function": {"name": "now", "arguments": ""}}]},
    {"role": "tool", "tool_call_id": "c3", "content": "noon"},
]
CONVERTED = [
    {"role": "user", "content": "Weather in Paris and Lyon?"},
    {"role": "assistant", "content":
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>'},
    {"role": "user", "content": "<tool_response>\n18C\n</tool_response>\n<tool_response>\n20C\n</tool_response>"},
    {"role": "assistant", "content":
        'Checking the time too.\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'},
    {"role": "user", "content": "<tool_response>\nnoon\n</tool_response>"},
]


def test_messages_for_generic_tools_without_tools() -> None:
    original = json.dumps(CONVERSATION)
    assert messages_for_generic_tools(CONVERSATION, None) == CONVERTED
    assert json.dumps(CONVERSATION) == original  # the input is left alone


def test_messages_for_generic_tools_adds_the_prompt() -> None:
    assert messages_for_generic_tools(CONVERSATION, [WEATHER, NOW]) == [
        {"role": "system", "content": EXPECTED_PROMPT}, *CONVERTED]
    with_system = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    assert messages_for_generic_tools(with_system, [WEATHER, NOW]) == [
        {"role": "system", "content": EXPECTED_PROMPT + "\n\nBe brief."}, *CONVERTED]


def test_the_generic_prompt_round_trips_through_the_hermes_parser() -> None:
    # What the prompt teaches is what the parser reads back.
    content = CONVERTED[1]["content"]
    assert HERMES.parse(content) == calls(("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Lyon"}'))
