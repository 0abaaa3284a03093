"""The engine end to end on a tiny random Llama: batching, chunking, preemption,
n > 1, stops, logprobs and aborts, checked against transformers and against itself."""

from __future__ import annotations

import pytest
import torch

from tokenloom import LLM, SamplingParams
from tokenloom.sampling_params import InvalidParameter
from tests.helpers.reference import hf_greedy

PROMPTS = [
    "The cat sat on the mat",
    "def add(a, b): return a + b",
    "Once upon a time there was a small model that generated text one token after another",
    "1 2 3 4 5 6 7 8 9",
    "hello",
    "The quick brown fox jumps over the lazy dog and keeps on running far away",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def make_llm(path, **options) -> LLM:
    options.setdefault("num_kv_blocks", 256)
    options.setdefault("block_size", 4)
    return LLM(str(path), **options)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return make_llm(tiny_checkpoint.hf_dir)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_matches_transformers(llm, tiny_checkpoint):
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for out in outputs:
        assert out.outputs[0].token_ids == hf_greedy(tiny_checkpoint.hf, out.prompt_token_ids, 24)
        assert out.outputs[0].finish_reason == "length"
        assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)


def test_gguf_and_safetensors_give_the_same_tokens(llm, tiny_checkpoint):
    from_gguf = make_llm(tiny_checkpoint.gguf_path)
    assert token_ids(from_gguf.generate(PROMPTS, GREEDY, use_tqdm=False)) == \
        token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False))


def test_batch_equals_one_by_one(llm):
    together = token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    alone = [token_ids(llm.generate(p, GREEDY, use_tqdm=False))[0] for p in PROMPTS]
    assert together == alone


def test_chunked_prefill_gives_the_same_tokens(llm, tiny_checkpoint):
    assert llm.engine.config.scheduler.max_num_batched_tokens == 512  # the CPU's default budget
    chunked = make_llm(tiny_checkpoint.hf_dir, max_num_batched_tokens=5)
    assert chunked.engine.config.scheduler.max_num_batched_tokens == 5
    assert token_ids(chunked.generate(PROMPTS, GREEDY, use_tqdm=False)) == \
        token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False))


def test_preemption_under_a_tight_cache_loses_nothing(llm, tiny_checkpoint):
    # 18 blocks of 4 tokens: six prompts of 2..42 tokens plus 24 outputs each cannot all fit.
    tight = make_llm(tiny_checkpoint.hf_dir, num_kv_blocks=18, max_model_len=72)
    got = token_ids(tight.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert tight.engine.stats.snapshot().num_preemptions_total > 0, "the scenario must force preemption"
    assert got == token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    tight.engine.check_integrity()
    assert tight.engine.kv_manager.num_free_blocks == 18


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_n_samples_share_prompt_blocks(tiny_checkpoint, prefix_caching):
    engine = make_llm(tiny_checkpoint.hf_dir, enable_prefix_caching=prefix_caching).engine
    prompt = list(range(10, 30))  # 20 tokens = 5 full blocks of 4
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    engine.add_request("shared", prompt, params)
    while len(engine.scheduler.running) < 3:
        engine.step()
    tables = [r.block_ids for r in engine.scheduler.running]
    shared = tables[0][:4]  # the last prompt token is recomputed, so 4 blocks are shared
    assert all(t[:4] == shared for t in tables)
    assert [engine.kv_manager.pool.ref_count(b) for b in shared] == [3, 3, 3, 3]
    if prefix_caching:
        # Samples 1, 2 recompute the full fifth block, find it cached by sample 0 and
        # swap their copy for it: one copy of the prompt's KV.
        assert len({t[4] for t in tables}) == 1
        assert engine.kv_manager.pool.ref_count(tables[0][4]) == 3
    else:
        assert len({t[4] for t in tables}) == 3
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_integrity()


def test_n_samples_are_seeded_per_sample(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    out = llm.generate("The cat", params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    samples = [c.token_ids for c in out.outputs]
    assert len({tuple(s) for s in samples}) == 3
    for i, sample in enumerate(samples):
        single = SamplingParams(temperature=1.0, seed=11 + i, max_tokens=12, ignore_eos=True)
        assert token_ids(llm.generate("The cat", single, use_tqdm=False))[0] == sample


def test_stop_string_truncates_text(llm):
    full = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0]
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    assert stop.strip(), "pick a stop string with visible characters"
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:full.text.index(stop)]
    kept = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                                                   include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[:full.text.index(stop) + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    full = llm.generate(PROMPTS[1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop_id = full[5]
    first = full.index(stop_id)
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)
    held = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_id],
                                                   min_tokens=first + 2), use_tqdm=False)[0].outputs[0]
    assert stop_id not in held.token_ids[:first + 2]
    assert len(held.token_ids) >= first + 2


def test_logprobs_match_transformers(llm, tiny_checkpoint):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(tiny_checkpoint.hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    prompt_len = len(out.prompt_token_ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == prompt_len
    for j in range(1, prompt_len):
        entry = out.prompt_logprobs[j]
        assert entry[ids[j]].logprob == pytest.approx(ref[j - 1, ids[j]].item(), abs=1e-4)
        top2 = ref[j - 1].topk(2).indices.tolist()
        assert [t for t, lp in entry.items() if lp.rank <= 2][:2] == top2 or set(top2) <= set(entry)
    for i, (tok, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        row = ref[prompt_len - 1 + i]
        assert entry[tok].rank == 1  # greedy picks the top token
        assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
        assert set(entry) == set(row.topk(3).indices.tolist())
        assert entry[tok].decoded_token == llm.tokenizer.decode_token(tok)
    assert out.outputs[0].cumulative_logprob == pytest.approx(
        sum(e[t].logprob for e, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)))


def test_abort_frees_blocks_at_once(llm):
    engine = llm.engine
    engine.add_request("a", PROMPTS[2], SamplingParams(max_tokens=50, ignore_eos=True, n=2))
    engine.add_request("b", PROMPTS[3], SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.abort_request("a")
    engine.check_integrity()
    held = sum(len(r.block_ids) for r in engine.scheduler.running)
    assert engine.kv_manager.pool.num_used_blocks == held
    assert [r.request_id for r in engine.scheduler.running] == ["b"]
    engine.abort_request("b")
    assert engine.kv_manager.pool.num_used_blocks == 0
    assert not engine.has_unfinished_requests()


def test_invalid_requests_are_rejected_and_leave_nothing(llm):
    engine = llm.engine
    with pytest.raises(InvalidParameter) as err:
        llm.generate(["fine", "x " * 600], GREEDY, use_tqdm=False)
    assert err.value.field_name == "prompt" and "512" in str(err.value)
    with pytest.raises(InvalidParameter) as err:
        llm.generate("fine", SamplingParams(top_p=1.5), use_tqdm=False)
    assert err.value.field_name == "top_p"
    with pytest.raises(InvalidParameter) as err:
        llm.generate({"prompt_token_ids": [1, 99999]}, GREEDY, use_tqdm=False)
    assert err.value.field_name == "prompt"
    with pytest.raises(InvalidParameter) as err:
        llm.generate("fine", SamplingParams(logit_bias={100000: 1.0}), use_tqdm=False)
    assert err.value.field_name == "logit_bias"
    assert not engine.has_unfinished_requests()
    assert engine.kv_manager.pool.num_used_blocks == 0


def test_chat_uses_the_template(llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    rendered = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert out.prompt_token_ids == llm.tokenizer.encode(rendered, add_special_tokens=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(llm, tiny_checkpoint):
    gpu = make_llm(tiny_checkpoint.hf_dir, device="cuda")
    assert token_ids(gpu.generate(PROMPTS, GREEDY, use_tqdm=False)) == \
        token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
