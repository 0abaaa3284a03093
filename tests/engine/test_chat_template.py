"""Chat templates render exactly as transformers renders them, inside jinja2's sandbox."""

from __future__ import annotations

from datetime import datetime

import pytest

from tests.helpers.tiny_tokenizer import CHATML_TEMPLATE, make_tiny_tokenizer, save_hf_tokenizer
from tokenloom.engine.chat_template import ChatTemplateError, compile_chat_template, render_chat_template
from tokenloom.engine.tokenizer import Tokenizer

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Whitespace control, namespace, slicing, loop.index0, raise_exception, tojson,
# bos/eos variables and the {% generation %} block, in the style of Llama/Mistral templates.
INST_TEMPLATE = """\
{{- bos_token }}
{%- if tools is not none %}
{{- '<|tools|>' + (tools | tojson(indent=2)) + '\n' }}
{%- endif %}
{%- set ns = namespace(system='') %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] | trim %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if ns.system %}
<<SYS>>{{ ns.system }}<</SYS>>
{% endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
[INST] {{ message['content'] | trim }} [/INST]
    {%- else %}
 {% generation %}{{ message['content'] | trim }}{% endgeneration %}{{ eos_token }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
 {{ '' }}
{%- endif %}
"""

# No whitespace control at all: the output depends on trim_blocks and lstrip_blocks.
PLAIN_BLOCKS_TEMPLATE = """\
{% for message in messages %}
  {% if message.role == 'system' %}
System: {{ message.content }}
  {% elif message.role == 'user' %}
User: {{ message.content }}
  {% else %}
Assistant: {{ message.content }}
  {% endif %}
{% endfor %}
{% if add_generation_prompt %}
Assistant:
{% endif %}
"""

TEMPLATES = {"chatml": CHATML_TEMPLATE, "smollm2": SMOLLM2_TEMPLATE, "inst": INST_TEMPLATE,
             "plain_blocks": PLAIN_BLOCKS_TEMPLATE}

SYSTEM_MULTI_TURN = [
    {"role": "system", "content": "  You are terse. Café 😀 <b>  "},
    {"role": "user", "content": "Name three colours."},
    {"role": "assistant", "content": "Red, green, blue."},
    {"role": "user", "content": "And two more?"},
]
NO_SYSTEM = SYSTEM_MULTI_TURN[1:]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a <city> & date",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    from transformers import AutoTokenizer

    directory = save_hf_tokenizer(tmp_path_factory.mktemp("hf"), make_tiny_tokenizer(), CHATML_TEMPLATE)
    return Tokenizer.from_path(directory), AutoTokenizer.from_pretrained(str(directory))


@pytest.mark.parametrize("template", TEMPLATES.values(), ids=TEMPLATES.keys())
@pytest.mark.parametrize("messages", [SYSTEM_MULTI_TURN, NO_SYSTEM], ids=["system", "no_system"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers(tokenizers_pair, template, messages, add_generation_prompt):
    ours, reference = tokenizers_pair
    expected = reference.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    rendered = ours.apply_chat_template(messages, add_generation_prompt, chat_template=template)
    assert rendered == expected
    expected_ids = reference.apply_chat_template(messages, chat_template=template, tokenize=True,
                                                 add_generation_prompt=add_generation_prompt, return_dict=False)
    assert ours.encode_chat(messages, add_generation_prompt, chat_template=template) == list(expected_ids)


def test_tools_render_like_transformers(tokenizers_pair):
    ours, reference = tokenizers_pair
    expected = reference.apply_chat_template(NO_SYSTEM, chat_template=INST_TEMPLATE, tools=TOOLS, tokenize=False)
    assert ours.apply_chat_template(NO_SYSTEM, False, chat_template=INST_TEMPLATE, tools=TOOLS) == expected
    assert '"description": "Weather for a <city> & date"' in expected  # tojson does not escape HTML


def test_exact_chatml_output(tokenizers_pair):
    ours, _ = tokenizers_pair
    assert ours.apply_chat_template(SYSTEM_MULTI_TURN[:2]) == (
        "<|im_start|>system\n  You are terse. Café 😀 <b>  <|im_end|>\n"
        "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_default_model_template_like_transformers(default_model_path):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_path(default_model_path)
    reference = AutoTokenizer.from_pretrained(str(default_model_path.parent), gguf_file=default_model_path.name)
    assert ours.chat_template == SMOLLM2_TEMPLATE
    for messages in (SYSTEM_MULTI_TURN, NO_SYSTEM):
        for add_generation_prompt in (True, False):
            expected = reference.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)
            assert ours.apply_chat_template(messages, add_generation_prompt) == expected
            expected_ids = reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                         return_dict=False)
            assert ours.encode_chat(messages, add_generation_prompt) == list(expected_ids)


def render(template: str, messages=None, **extra) -> str:
    messages = [{"role": "user", "content": "hi"}] if messages is None else messages
    return render_chat_template(template, messages, add_generation_prompt=True,
                                special_tokens={"bos_token": "<s>", "eos_token": "</s>"}, **extra)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ self.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{% set ns = namespace(__dict__=1) %}",
    "{% set ns = namespace() %}{% set ns._private = 2 %}",
])
def test_sandbox_blocks_malicious_templates(template):
    with pytest.raises(ChatTemplateError, match="the chat template attempted an unsafe operation"):
        render(template)


def test_raise_exception_becomes_a_clear_error():
    bad_turns = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        render(INST_TEMPLATE, bad_turns)


def test_template_bugs_and_syntax_errors_are_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render("{% for %}")
    with pytest.raises(ChatTemplateError, match="failed on this conversation"):
        render("{{ messages[0]['content'] + none }}")


def test_no_template_is_a_clear_error(tmp_path):
    directory = save_hf_tokenizer(tmp_path, make_tiny_tokenizer(), chat_template=None)
    tok = Tokenizer.from_path(directory)
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="this model has no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])
    assert issubclass(ChatTemplateError, ValueError)


def test_content_parts_are_joined():
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    messages = [{"role": "user", "content": parts}]
    assert render("{{ messages[0]['content'] }}", messages) == "first\nsecond"


@pytest.mark.parametrize(("messages", "error"), [
    ([{"content": "hi"}], r"messages\[0\] needs a 'role' string"),
    ([{"role": "user"}], r"messages\[0\] needs 'content'"),
    ([{"role": "user", "content": "a"}, "not a dict"], r"messages\[1\] must be an object"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     r"messages\[0\].content\[0\]: only .* parts are supported, got 'image_url'"),
    ([{"role": "user", "content": 5}], r"messages\[0\].content must be a string or a list of text parts"),
    ([{"role": "user", "content": "hi", "meta": object()}], r"messages\[0\].meta: object values cannot be passed"),
    ("hello", "messages must be a list"),
])
def test_invalid_messages(messages, error):
    with pytest.raises(ChatTemplateError, match=error):
        render(CHATML_TEMPLATE, messages)


def test_tool_call_turn_without_content_is_accepted():
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call]}]
    template = ("{% for m in messages %}{{ m.role }}:"
                "{{ m.content if m.content else m.tool_calls | tojson }};{% endfor %}")
    assert render(template, messages) == (
        'user:weather?;assistant:[{"type": "function", "function": {"name": "get_weather", '
        '"arguments": {"city": "Oslo"}}}];')


def test_helpers_and_variables():
    assert render("{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}") == "<s>|</s>|True"
    assert render("{{ {'a': '<b> é'} | tojson }}") == '{"a": "<b> é"}'
    assert render("{{ [1, 2] | tojson(indent=1) }}") == "[\n 1,\n 2\n]"
    before = datetime.now().strftime("%Y")
    assert render("{{ strftime_now('%Y') }}") in {before, datetime.now().strftime("%Y")}
    assert render("{% for m in [1, 2, 3] %}{% if m == 2 %}{% continue %}{% endif %}{{ m }}{% endfor %}") == "13"
    assert render("{% generation %}kept {{ 1 + 1 }}{% endgeneration %}") == "kept 2"
    assert render("{{ enable_thinking }}", enable_thinking=False) == "False"
    assert render("{{ tools is none }}") == "True"


def test_caller_messages_are_not_modified():
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}]}]
    render(CHATML_TEMPLATE, messages)
    assert messages == [{"role": "user", "content": [{"type": "text", "text": "a"}]}]


def test_each_template_is_compiled_once():
    source = "{{ messages | length }} compiled once"
    assert compile_chat_template(source) is compile_chat_template(source)
