"""Speculative decoding on a tiny random Llama: with n-gram or draft-model drafts the
engine gives exactly the tokens it gives without them (greedy, and seeded sampling
with n-gram drafts), under batching, chunking, preemption, prefix caching, n > 1,
stops, logprobs and structured output; KV accounting holds after every step."""

from __future__ import annotations

import pytest

from tokenloom import LLM, SamplingParams, StructuredOutputsParams
from tokenloom.request import RequestOutput, merge_delta
from tests.engine.test_engine import make_llm, token_ids

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
         "disable_by_batch_size": None}
# Repetitive prompts: a random model given these falls into loops that n-grams predict,
# and leaves them again, so drafts are both accepted and rejected.
PROMPTS = [
    "a b c a b c a b c a b",
    "The cat sat on the mat. The cat sat on the mat. The cat",
    "1 2 3 4 1 2 3 4 1 2",
    "hello hello hello",
    "def add(a, b): return a + b\ndef add(a, b):",
    "Once upon a time there was a model. Once upon a time",
]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(tiny_checkpoint) -> LLM:
    return make_llm(tiny_checkpoint.hf_dir)


@pytest.fixture(scope="module")
def ngram(tiny_checkpoint) -> LLM:
    return make_llm(tiny_checkpoint.hf_dir, speculative_config=NGRAM)


def generate_checked(llm: LLM, prompts, params) -> list:
    """Step the engine by hand, checking every invariant after every step."""
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params if not isinstance(params, list) else params[i])
    outputs: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            outputs[delta.request_id] = merge_delta(outputs.get(delta.request_id), delta)
        engine.check_integrity()
    assert engine.kv_manager.usage == 0
    assert all(out.finished for out in outputs.values())
    return [outputs[f"r{i}"] for i in range(len(prompts))]


def spec_counts(llm: LLM) -> tuple[int, int]:
    s = llm.engine.stats.snapshot()
    return s.spec_decode_draft_tokens_total, s.spec_decode_accepted_tokens_total


def test_greedy_tokens_are_the_same_and_drafts_both_win_and_lose(plain, ngram):
    before = spec_counts(ngram)
    got = token_ids(generate_checked(ngram, PROMPTS, GREEDY))
    assert got == token_ids(plain.generate(PROMPTS, GREEDY, use_tqdm=False))
    drafted, accepted = (a - b for a, b in zip(spec_counts(ngram), before))
    assert 0 < accepted < drafted, "the prompts must exercise both accepted and rejected drafts"
    steps = ngram.engine.stats.snapshot().num_steps_total
    assert steps < len(PROMPTS) * 40, "speculation must save steps"


@pytest.mark.parametrize("options", [dict(max_num_batched_tokens=5), dict(num_kv_blocks=24, max_model_len=96),
                                     dict(enable_prefix_caching=False)],
                         ids=["chunked", "preempted", "no-prefix-cache"])
def test_greedy_tokens_survive_chunking_preemption_and_cache_off(plain, tiny_checkpoint, options):
    llm = make_llm(tiny_checkpoint.hf_dir, speculative_config=NGRAM, **options)
    got = token_ids(generate_checked(llm, PROMPTS, GREEDY))
    assert got == token_ids(plain.generate(PROMPTS, GREEDY, use_tqdm=False))
    if "num_kv_blocks" in options:
        assert llm.engine.stats.snapshot().num_preemptions_total > 0, "the scenario must force preemption"


def test_seeded_sampling_gives_the_same_tokens_and_logprobs(plain, ngram):
    """With n-gram drafts a random row keeps the target's own draw (same stream, same
    position), so a seed gives the very same tokens; logprobs are the target's."""
    params = [SamplingParams(temperature=t, top_p=0.9, top_k=k, seed=7 + i, max_tokens=32, ignore_eos=True,
                             logprobs=2, repetition_penalty=r, frequency_penalty=f)
              for i, (t, k, r, f) in enumerate([(0.5, 0, 1.0, 0.0), (1.0, 20, 1.2, 0.0), (0.3, 0, 1.0, 0.5),
                                                (0.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (0.4, 0, 1.1, 0.2)])]
    before = spec_counts(ngram)
    got = generate_checked(ngram, PROMPTS, params)
    want = [plain.generate(p, s, use_tqdm=False)[0] for p, s in zip(PROMPTS, params)]
    assert token_ids(got) == token_ids(want)
    for g, w in zip(got, want):
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert a.keys() == b.keys()
            assert all(a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4) and a[t].rank == b[t].rank for t in a)
    drafted, accepted = (a - b for a, b in zip(spec_counts(ngram), before))
    assert accepted > 0


def test_stops_cut_an_accepted_run(plain, ngram):
    """A stop that lands inside a run of accepted drafts ends the output right there."""
    reference = plain.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, ref in zip(PROMPTS, reference):
        ids, text = ref.outputs[0].token_ids, ref.outputs[0].text
        stop_token = ids[17]
        stop_string = text[len(text) // 2:len(text) // 2 + 3]
        for params in (SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_token]),
                       SamplingParams(temperature=0, max_tokens=40, stop=[stop_string], ignore_eos=True),
                       SamplingParams(temperature=0, max_tokens=23, ignore_eos=True),
                       SamplingParams(temperature=0, max_tokens=40, stop=[stop_string], ignore_eos=True,
                                      include_stop_str_in_output=True)):
            want = plain.generate(prompt, params, use_tqdm=False)[0].outputs[0]
            got = generate_checked(ngram, [prompt], params)[0].outputs[0]
            assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
                (want.token_ids, want.text, want.finish_reason, want.stop_reason)


def test_n_samples_and_prefix_hits(plain, ngram):
    params = SamplingParams(n=3, temperature=0.8, seed=3, max_tokens=24, ignore_eos=True)
    for _ in range(2):  # the second round finds the prompts cached
        got = generate_checked(ngram, PROMPTS[:3], params)
        want = plain.generate(PROMPTS[:3], params, use_tqdm=False)
        assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]


def test_structured_output_rolls_its_grammar_back_with_the_drafts(plain, ngram):
    specs = [StructuredOutputsParams(regex=r"(ab|a b )+c"), StructuredOutputsParams(choice=["hello hello", "bye"]),
             StructuredOutputsParams(regex=r"([0-9] ){3,12}")]
    params = [SamplingParams(temperature=0, max_tokens=30, structured_outputs=s) for s in specs]
    prompts = ["a b a b a b", "hello hello hello", "1 2 3 1 2 3 1"]
    got = generate_checked(ngram, prompts, params)
    want = [plain.generate(p, s, use_tqdm=False)[0] for p, s in zip(prompts, params)]
    assert token_ids(got) == token_ids(want)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in want]


def test_speculation_off_above_the_batch_size_limit(plain, tiny_checkpoint):
    llm = make_llm(tiny_checkpoint.hf_dir, speculative_config={**NGRAM, "disable_by_batch_size": 2})
    params = [SamplingParams(temperature=0, max_tokens=40 if i >= 4 else 6, ignore_eos=True) for i in range(6)]
    got = token_ids(generate_checked(llm, PROMPTS, params))
    assert got == token_ids([plain.generate(p, s, use_tqdm=False)[0] for p, s in zip(PROMPTS, params)])
    assert spec_counts(llm)[0] > 0  # the last two sequences, once alone, speculate
    alone = make_llm(tiny_checkpoint.hf_dir, speculative_config={**NGRAM, "disable_by_batch_size": 1})
    generate_checked(alone, PROMPTS[:2], GREEDY)
    assert spec_counts(alone) == (0, 0)  # never fewer than two running


# ---- draft model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_draft(tiny_checkpoint, tmp_path_factory):
    """Another random model with the target's tokenizer: its drafts are mostly wrong."""
    from tests.helpers.tiny_models import make_tiny_model, save_hf_model
    from tests.helpers.tiny_tokenizer import make_tiny_tokenizer

    return save_hf_model(make_tiny_model("smollm", seed=5), tmp_path_factory.mktemp("draft") / "hf",
                         tokenizer=make_tiny_tokenizer(512))


def draft_config(path, k=3) -> dict:
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": k, "disable_by_batch_size": None}


@pytest.mark.parametrize("draft", ["self", "other"])
def test_draft_model_greedy_tokens_are_the_same(plain, tiny_checkpoint, other_draft, draft):
    path = tiny_checkpoint.hf_dir if draft == "self" else other_draft
    llm = make_llm(tiny_checkpoint.hf_dir, speculative_config=draft_config(path), max_num_batched_tokens=16)
    got = token_ids(generate_checked(llm, PROMPTS, GREEDY))
    assert got == token_ids(plain.generate(PROMPTS, GREEDY, use_tqdm=False))
    drafted, accepted = spec_counts(llm)
    if draft == "self":
        assert accepted == drafted > 0  # the target drafting for itself is always right
    else:
        assert 0 <= accepted < drafted
    assert not llm.engine.drafter.draft_model._shadows, "finished sequences' draft state is let go"
    assert llm.engine.drafter.draft_model.kv.num_free_blocks == llm.engine.drafter.draft_model.kv.num_blocks


def test_draft_model_sampling_is_seeded_and_exact_with_itself(tiny_checkpoint, other_draft):
    params = [SamplingParams(temperature=0.8, top_k=50, seed=i, max_tokens=24, ignore_eos=True) for i in range(4)]
    runs = []
    for _ in range(2):
        llm = make_llm(tiny_checkpoint.hf_dir, speculative_config=draft_config(other_draft, k=4))
        runs.append(token_ids(generate_checked(llm, PROMPTS[:4], params)))
    assert runs[0] == runs[1]
    # Drafting with the target itself: q == p, so rejection sampling accepts every draft.
    llm = make_llm(tiny_checkpoint.hf_dir, speculative_config=draft_config(tiny_checkpoint.hf_dir, k=4))
    generate_checked(llm, PROMPTS[:4], params)
    drafted, accepted = spec_counts(llm)
    assert drafted > 0 and accepted / drafted > 0.95


def test_draft_model_with_another_vocabulary_is_refused(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.helpers.tiny_models import save_hf_model
    from tests.helpers.tiny_tokenizer import make_tiny_tokenizer

    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, num_hidden_layers=1, max_position_embeddings=512)
    path = save_hf_model(AutoModelForCausalLM.from_config(config), tmp_path / "hf", tokenizer=make_tiny_tokenizer(300))
    with pytest.raises(ValueError, match="another vocabulary"):
        make_llm(tiny_checkpoint.hf_dir, speculative_config=draft_config(path))


def test_draft_model_under_preemption_and_with_a_grammar(plain, tiny_checkpoint, other_draft):
    tight = make_llm(tiny_checkpoint.hf_dir, speculative_config=draft_config(tiny_checkpoint.hf_dir),
                     num_kv_blocks=24, max_model_len=96)
    got = token_ids(generate_checked(tight, PROMPTS, GREEDY))
    assert got == token_ids(plain.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert tight.engine.stats.snapshot().num_preemptions_total > 0, "the scenario must force preemption"
    llm = make_llm(tiny_checkpoint.hf_dir, speculative_config=draft_config(other_draft))
    params = SamplingParams(temperature=0, max_tokens=30, structured_outputs=StructuredOutputsParams(
        regex=r"([0-9] ){3,12}"))
    got = generate_checked(llm, ["1 2 3 1 2 3 1", "hello"], params)
    assert token_ids(got) == token_ids(plain.generate(["1 2 3 1 2 3 1", "hello"], params, use_tqdm=False))


def test_prompt_logprobs_and_an_abort_mid_speculation(plain, ngram):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=1, logprobs=1)
    got = generate_checked(ngram, PROMPTS[:2], params)
    want = plain.generate(PROMPTS[:2], params, use_tqdm=False)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert [None if e is None else e.keys() for e in g.prompt_logprobs] == \
            [None if e is None else e.keys() for e in w.prompt_logprobs]
    engine = ngram.engine
    engine.add_request("gone", PROMPTS[0], GREEDY)
    for _ in range(6):
        engine.step()
    assert engine.scheduler.get_request("gone").num_output_tokens > 1
    engine.abort_request("gone")
    engine.check_integrity()
    assert engine.kv_manager.usage == 0 and not engine.has_unfinished_requests()


def test_a_draft_models_cache_shares_the_kv_budget(tiny_checkpoint, other_draft):
    """Target and draft hold the same number of tokens, and both fit in --kv-cache-memory."""
    from tokenloom.engine.memory import GiB, kv_bytes_per_token

    plain_llm = LLM(str(tiny_checkpoint.hf_dir), kv_cache_memory=0.01, block_size=4)
    llm = LLM(str(tiny_checkpoint.hf_dir), kv_cache_memory=0.01, block_size=4,
              speculative_config=draft_config(other_draft))
    target, draft = llm.engine.arch, llm.engine.drafter.draft_model.runner.arch
    per_token = (kv_bytes_per_token(target, target.head_dim * 4) + kv_bytes_per_token(draft, draft.head_dim * 4))
    assert llm.engine.config.cache.num_blocks == int(0.01 * GiB) // (per_token * 4)
    assert llm.engine.config.cache.num_blocks < plain_llm.engine.config.cache.num_blocks
    assert llm.engine.drafter.draft_model.kv.num_blocks == llm.engine.config.cache.num_blocks
