"""Structured output on a tiny random Llama: whatever the weights, the output follows the
grammar, for every request of a mixed batch, greedy or sampled, n > 1, under preemption."""

from __future__ import annotations

import json
import re
from concurrent.futures import Future

import jsonschema
import pytest
import torch

from tokenloom import LLM, SamplingParams, StructuredOutputsParams
from tokenloom.engine.llm_engine import LLMEngine
from tokenloom.request import RequestStatus
from tokenloom.sampling_params import InvalidParameter
from tokenloom.structured import GrammarCompileError

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["Ada", "Alan", "Grace"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 2},
        "pet": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/pet"}]},
    },
    "required": ["name", "age", "tags", "pet"],
    "additionalProperties": False,
    "$defs": {"pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}},
                      "required": ["kind"], "additionalProperties": False}},
}
REGEX = r"(yes|no), [0-9]{2,4}(\.[0-9])?"
CHOICES = ["red", "green", "blue"]
GBNF = 'root ::= "x=" digit digit? ";"\ndigit ::= [0-9]'
PROMPTS = ["The cat sat on the mat", "1 2 3 4", "Once upon a time", "hello", "def add(a, b):"]


def valid(kind: str, text: str) -> bool:
    if kind == "json":
        jsonschema.validate(json.loads(text), PERSON)
        return True
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    if kind == "choice":
        return text in CHOICES
    return re.fullmatch(r"x=[0-9]{1,2};", text) is not None


SPECS = {"json": StructuredOutputsParams(json=PERSON), "regex": StructuredOutputsParams(regex=REGEX),
         "choice": StructuredOutputsParams(choice=CHOICES), "grammar": StructuredOutputsParams(grammar=GBNF)}


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM(str(tiny_checkpoint.hf_dir), num_kv_blocks=256, block_size=4)


def params(kind: str, **options) -> SamplingParams:
    options.setdefault("max_tokens", 400)
    return SamplingParams(structured_outputs=SPECS[kind], **options)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_kind_is_followed_greedy_and_sampled(llm, temperature):
    for kind in SPECS:
        outs = llm.generate(PROMPTS, params(kind, temperature=temperature, seed=3), use_tqdm=False)
        for out in outs:
            c = out.outputs[0]
            assert c.finish_reason == "stop", (kind, c.text)
            assert valid(kind, c.text), (kind, c.text)


def test_json_object_is_any_object(llm):
    spec = StructuredOutputsParams(json_object=True)
    [out] = llm.generate("{", SamplingParams(temperature=0, max_tokens=200, structured_outputs=spec), use_tqdm=False)
    if out.outputs[0].finish_reason == "stop":  # a random model may write a long object
        assert isinstance(json.loads(out.outputs[0].text), dict)
    else:
        assert out.outputs[0].text.lstrip().startswith("{")


def test_mixed_batch_equals_each_request_alone(llm):
    """Constrained and free requests in one batch: each gets the tokens it gets alone
    (the bitmask touches only its own rows)."""
    kinds = [None, "json", None, "regex", "choice", None, "grammar"]
    batch = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True) if k is None else params(k, temperature=0)
             for k in kinds]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(kinds))]
    together = llm.generate(prompts, batch, use_tqdm=False)
    alone = [llm.generate(p, sp, use_tqdm=False)[0] for p, sp in zip(prompts, batch)]
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    for kind, out in zip(kinds, together):
        if kind is not None:
            assert valid(kind, out.outputs[0].text)


def test_n_samples_each_follow_the_grammar_and_seeds_repeat(llm):
    sp = params("json", temperature=1.2, n=4, seed=11)
    [first] = llm.generate(PROMPTS[0], sp, use_tqdm=False)
    [again] = llm.generate(PROMPTS[0], sp, use_tqdm=False)
    assert [c.text for c in first.outputs] == [c.text for c in again.outputs]
    for c in first.outputs:
        assert valid("json", c.text)


def test_preemption_keeps_the_matcher_in_step(tiny_checkpoint):
    """With too few blocks, requests are preempted and recomputed; the grammar state stays
    with the output tokens, so the answers equal those of a roomy cache."""
    roomy = LLM(str(tiny_checkpoint.hf_dir), num_kv_blocks=256, block_size=4)
    tight = LLM(str(tiny_checkpoint.hf_dir), num_kv_blocks=40, block_size=4, max_model_len=100)
    batch = [params("json", temperature=0.7, seed=i, max_tokens=60) for i in range(6)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(6)]
    expected = [o.outputs[0].text for o in roomy.generate(prompts, batch, use_tqdm=False)]
    got = tight.generate(prompts, batch, use_tqdm=False)
    assert tight.engine.stats.snapshot().num_preemptions_total > 0
    assert [o.outputs[0].text for o in got] == expected
    tight.engine.check_integrity()


def test_logprobs_stay_the_models_own(llm):
    """The sampled token's logprob is the raw model's: forcing a choice shows ranks > 1."""
    sp = SamplingParams(temperature=0, max_tokens=30, logprobs=2,
                        structured_outputs=StructuredOutputsParams(choice=["zzzz qqqq xxxx"]))
    [out] = llm.generate(PROMPTS[0], sp, use_tqdm=False)
    c = out.outputs[0]
    assert c.text == "zzzz qqqq xxxx"
    ranks = [entry[t].rank for entry, t in zip(c.logprobs, c.token_ids)]
    assert max(ranks) > 1 and all(entry[t].logprob <= 0 for entry, t in zip(c.logprobs, c.token_ids))


@pytest.mark.parametrize("spec, reason", [
    (StructuredOutputsParams(regex="a(b"), "regex"),
    (StructuredOutputsParams(grammar='root ::= "a" | ('), "grammar"),
    (StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "wat"}}}), "json"),
])
def test_a_grammar_that_does_not_compile_is_an_error_before_anything_runs(llm, spec, reason):
    with pytest.raises(InvalidParameter, match=reason) as info:
        llm.generate(PROMPTS, SamplingParams(structured_outputs=spec), use_tqdm=False)
    assert info.value.field_name == "structured_outputs"
    assert not llm.engine.has_unfinished_requests()
    llm.engine.check_integrity()


@pytest.mark.parametrize("spec", [
    StructuredOutputsParams(), StructuredOutputsParams(regex="a", choice=["a"]),
    StructuredOutputsParams(choice=[]), StructuredOutputsParams(json="{not json"),
    StructuredOutputsParams(grammar="  "),
])
def test_malformed_specs_are_refused_by_validate(spec):
    with pytest.raises(InvalidParameter) as info:
        SamplingParams(structured_outputs=spec).validate()
    assert info.value.field_name == "structured_outputs"


@pytest.mark.parametrize("failed_before_admission", [True, False])
def test_engine_finishes_a_request_whose_grammar_fails_with_the_error(tiny_checkpoint, failed_before_admission):
    engine = LLMEngine.from_options(str(tiny_checkpoint.hf_dir), num_kv_blocks=64, block_size=4)
    bad = StructuredOutputsParams(regex="a(b")
    pending: Future = Future()
    if failed_before_admission:
        assert engine.structured.compile(bad).exception() is not None
    else:  # the compile is still running when the request is admitted, and fails afterwards
        engine.structured.compile = lambda spec: pending
    engine.add_request("bad", "hello", SamplingParams(structured_outputs=bad))
    engine.add_request("good", "hello", SamplingParams(max_tokens=3, ignore_eos=True))
    outputs = engine.step()
    if not failed_before_admission:
        pending.set_exception(GrammarCompileError("regex: unclosed group"))
    for _ in range(20):
        if not engine.has_unfinished_requests():
            break
        outputs.extend(engine.step())
    failed = [o for o in outputs if o.request_id == "bad"]
    assert len(failed) == 1 and failed[0].finished and "regex" in failed[0].error
    assert sum(len(o.outputs[0].token_ids) for o in outputs if o.request_id == "good") == 3
    engine.check_integrity()
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


def test_grammars_are_compiled_once_per_spec(llm):
    manager = llm.engine.structured
    first = manager.compile(StructuredOutputsParams(json=PERSON))
    again = manager.compile(StructuredOutputsParams(json=json.dumps(PERSON)))
    assert again is first  # the same schema as dict or as JSON text is one cache entry
    assert manager.compile(StructuredOutputsParams(regex=REGEX)) is not first
    assert RequestStatus.FINISHED_STOPPED.finish_reason == "stop"


def test_offline_chat_with_tools_and_a_forced_call(llm):
    from tokenloom.engine.tool_prompt import function_spec
    from tokenloom.entrypoints.openai.tool_parsers import get_tool_parser

    tool = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"x": {"enum": ["a", "b"]}}, "required": ["x"]}}}
    parser = get_tool_parser("hermes")
    forced = StructuredOutputsParams(grammar=parser.call_grammar([function_spec(tool)], parallel=False))
    [out] = llm.chat([{"role": "user", "content": "pick one"}],
                     SamplingParams(temperature=0, max_tokens=60, structured_outputs=forced), use_tqdm=False,
                     tools=[tool])
    prompt = llm.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
    assert "<tools>" in prompt and '"name": "pick"' in prompt
    [call] = parser.parse(out.outputs[0].text).tool_calls
    assert call.name == "pick" and json.loads(call.arguments)["x"] in ("a", "b")


def test_parallel_and_sequential_bitmask_fills_agree(llm, monkeypatch):
    """Large batches on many-core machines fill masks on llguidance's thread pool: the same bits."""
    from tokenloom.structured import manager as manager_module

    manager = llm.engine.structured
    kinds = ("json", "regex", "choice", "grammar")
    grammars = [manager.sequence_grammar(SPECS[kind]) for _ in range(2) for kind in kinds]
    for g in grammars:
        g.compiled.result()
    for g, token in zip(grammars[4:], (ord("{"), ord("y"), ord("r"), ord("x"))):
        assert g.accept(next(t for t in range(llm.tokenizer.vocab_size) if llm.tokenizer.decode([t]) == chr(token)))
    sequential = manager.fill_bitmask(grammars)
    monkeypatch.setattr(manager_module, "PARALLEL_FILL_MIN_ROWS", 2)
    monkeypatch.setattr(manager_module, "PARALLEL_FILL_MIN_CPUS", 1)
    parallel = manager.fill_bitmask(grammars)
    assert torch.equal(parallel, sequential)
    assert not torch.equal(sequential[0], sequential[4])  # the advanced matchers allow other tokens


def test_sentencepiece_gguf_vocabulary_follows_grammars(tmp_path):
    """A Llama-style GGUF vocabulary (▁ for spaces, <0xNN> byte tokens): the tokens our
    tokenizer makes for a text are the ones the grammar allows, accented bytes included."""
    from tests.helpers.tiny_tokenizer import (
        make_tiny_sentencepiece,
        write_gguf_sentencepiece_metadata,
        write_tokenizer_gguf,
    )
    from tokenloom.engine.tokenizer import Tokenizer
    from tokenloom.structured import StructuredOutputManager

    spm = make_tiny_sentencepiece()
    tokenizer = Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "spm.gguf", write_gguf_sentencepiece_metadata,
                                                         spm, None))
    manager = StructuredOutputManager(tokenizer, tokenizer.vocab_size, tokenizer.eos_token_ids)
    # The grammar sees token bytes: SentencePiece's dummy prefix makes "the" the token "▁the", " the".
    choices = [" the river wound", " naïve café 42"]
    for text in choices:
        grammar = manager.sequence_grammar(StructuredOutputsParams(choice=choices))
        ids = tokenizer.encode(text[1:], add_special_tokens=False)
        assert any(tokenizer.id_to_token(t).startswith("<0x") for t in ids) == ("ï" in text)
        for token in ids:
            assert grammar.accept(token), (text, tokenizer.id_to_token(token))
        assert grammar.is_terminated or grammar.accept(tokenizer.eos_token_ids[0])
    wrong = manager.sequence_grammar(StructuredOutputsParams(choice=choices))
    assert not all(wrong.accept(t) for t in tokenizer.encode("the lake", add_special_tokens=False))
    assert tokenizer.decode(tokenizer.encode(choices[1][1:], add_special_tokens=False)) == choices[1][1:]
