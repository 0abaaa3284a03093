"""Prefix caching end to end: the same tokens with the cache on and off, exact
cached-token counts, the engine's prefix-cache counters; and (slow) the same on
the default model with a long shared system prompt."""

from __future__ import annotations

import os

import pytest

from tokenloom import LLM, SamplingParams

BLOCK_SIZE = 4
SHARED = [(7 * i) % 400 + 50 for i in range(40)]  # 10 full blocks
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def make_llm(path, prefix_caching: bool, **options) -> LLM:
    options.setdefault("num_kv_blocks", 256)
    return LLM(str(path), block_size=BLOCK_SIZE, enable_prefix_caching=prefix_caching, **options)


def cached_tokens(outputs) -> list[int]:
    return [o.num_cached_tokens for o in outputs]


def as_inputs(prompts: list[list[int]]) -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": p} for p in prompts]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def expected_hit(prompt: list[int], cached: list[int]) -> int:
    """Tokens a prompt may reuse from a cached sequence: their common prefix in whole
    blocks, leaving at least the prompt's last token to compute."""
    common = len(os.path.commonprefix([prompt, cached]))
    return min(common, len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE


MIXED = [
    SHARED + [401, 402, 403],
    SHARED[:13],  # a prefix of the cached prompt: 3 blocks
    SHARED,  # exactly 10 blocks: 9 reused, the last computed
    [300, 301, 302, 303, 304, 305],  # nothing in common
    SHARED + [410 + i for i in range(9)],
    SHARED[:20] + [420, 421],
]


def test_same_tokens_with_cache_on_and_off_and_exact_hits(tiny_checkpoint):
    on = make_llm(tiny_checkpoint.hf_dir, True)
    off = make_llm(tiny_checkpoint.hf_dir, False)
    warm = SHARED + [399]
    assert token_ids(on.generate(as_inputs([warm]), GREEDY, use_tqdm=False)) == \
        token_ids(off.generate(as_inputs([warm]), GREEDY, use_tqdm=False))

    got_on = on.generate(as_inputs(MIXED), GREEDY, use_tqdm=False)
    got_off = off.generate(as_inputs(MIXED), GREEDY, use_tqdm=False)
    assert token_ids(got_on) == token_ids(got_off)
    # warm's computed tokens (prompt + all outputs but the last) are cached.
    assert cached_tokens(got_on) == [40, 12, 36, 0, 40, 20]
    assert cached_tokens(got_on) == [expected_hit(p, warm) for p in MIXED]
    assert cached_tokens(got_off) == [0] * len(MIXED)

    stats = on.engine.stats.snapshot()
    assert stats.prefix_cache_queries_total == len(warm) + sum(map(len, MIXED))
    assert stats.prefix_cache_hits_total == 40 + 12 + 36 + 40 + 20
    stats_off = off.engine.stats.snapshot()
    assert (stats_off.prefix_cache_queries_total, stats_off.prefix_cache_hits_total) == (0, 0)
    # Prefill actually skipped: the cache-on engine computed fewer prompt tokens.
    assert stats_off.prompt_tokens_total - on.engine.stats.snapshot().prompt_tokens_total == 148
    for llm in (on, off):
        llm.engine.check_integrity()
        assert llm.engine.kv_manager.pool.num_used_blocks == 0
    assert on.engine.kv_manager.pool.num_evictable_blocks > 0
    assert off.engine.kv_manager.pool.num_evictable_blocks == 0
    assert off.engine.kv_manager.prefix_cache is None


def test_multi_turn_chat_reuses_the_history(tiny_checkpoint):
    on = make_llm(tiny_checkpoint.hf_dir, True)
    off = make_llm(tiny_checkpoint.hf_dir, False)
    chat = [{"role": "system", "content": "You answer in one short line, always."},
            {"role": "user", "content": "hello there"}]
    for turn in range(3):
        out_on = on.chat(chat, GREEDY, use_tqdm=False)[0]
        out_off = off.chat(chat, GREEDY, use_tqdm=False)[0]
        assert out_on.outputs[0].token_ids == out_off.outputs[0].token_ids
        hit = out_on.num_cached_tokens
        if turn == 0:
            assert hit == 0
        else:
            assert hit == expected_hit(out_on.prompt_token_ids, computed) and hit > 0
        computed = out_on.prompt_token_ids + out_on.outputs[0].token_ids[:-1]
        chat = chat + [{"role": "assistant", "content": out_on.outputs[0].text},
                       {"role": "user", "content": f"and again {turn}"}]
    on.engine.check_integrity()


def test_chunked_prefill_preemption_and_n_agree_with_cache_off(tiny_checkpoint):
    # 20 blocks of 4, a budget of 6 tokens a step: chunked prefills, evictions, preemptions.
    options = dict(num_kv_blocks=20, max_model_len=80, max_num_batched_tokens=6)
    on = make_llm(tiny_checkpoint.hf_dir, True, **options)
    off = make_llm(tiny_checkpoint.hf_dir, False, **options)
    prompts = as_inputs(MIXED + [SHARED[:30] + [430, 431]])
    params = [GREEDY] * len(MIXED) + [SamplingParams(n=2, temperature=0.8, seed=5, max_tokens=12,
                                                     ignore_eos=True)]
    for _ in range(2):  # the second round runs against a warm cache
        got_on = on.generate(prompts, params, use_tqdm=False)
        got_off = off.generate(prompts, params, use_tqdm=False)
        assert [[c.token_ids for c in o.outputs] for o in got_on] == \
            [[c.token_ids for c in o.outputs] for o in got_off]
    assert on.engine.stats.snapshot().num_preemptions_total > 0, "the scenario must force preemption"
    assert sum(cached_tokens(got_on)) > 0
    on.engine.check_integrity()
    assert on.engine.kv_manager.pool.num_used_blocks == 0


def test_abort_keeps_blocks_other_requests_share(tiny_checkpoint):
    engine = make_llm(tiny_checkpoint.hf_dir, True).engine
    long_params = SamplingParams(max_tokens=40, ignore_eos=True)
    engine.add_request("a", SHARED + [401], long_params)
    engine.step()
    engine.add_request("b", SHARED + [402], long_params)
    engine.step()
    a, b = engine.scheduler.get_request("a"), engine.scheduler.get_request("b")
    assert b.num_cached_tokens == 40 and a.block_ids[:10] == b.block_ids[:10]
    engine.abort_request("a")
    assert [engine.kv_manager.pool.ref_count(i) for i in b.block_ids[:10]] == [1] * 10
    engine.check_integrity()
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_integrity()
    assert engine.kv_manager.pool.num_used_blocks == 0


# ---- the default model (slow) ---------------------------------------------------------------

SYSTEM_PROMPT = (
    "You are a meticulous assistant for a small bakery. Answer customers' questions about "
    "opening hours, ingredients, allergens, prices and orders. The bakery opens at 7 am and "
    "closes at 6 pm from Monday to Saturday; it is closed on Sundays. All bread is baked with "
    "organic flour; the rye and spelt loaves contain gluten; the almond croissants contain nuts. "
) * 3

QUESTIONS = [
    "When do you open on Saturday?",
    "Do the almond croissants contain nuts?",
    "Is the bakery open on Sunday?",
    "What flour do you use?",
    "Can I order a cake for Friday?",
    "Which loaves contain gluten?",
    "What time do you close?",
    "Do you sell coffee?",
]


@pytest.mark.slow
def test_default_model_long_system_prompt_same_tokens(default_model_path):
    chats = [[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}]
             for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=24)
    results = {}
    for caching in (True, False):
        # The exact path: with the cache on, the suffixes are computed in smaller batches, and
        # the fast path's numbers depend a little on batch size (layers/quantization.py).
        llm = LLM(str(default_model_path), dtype="float32", quantization="none", max_model_len=2048,
                  kv_cache_memory=0.5, enable_prefix_caching=caching)
        first = llm.chat(chats[:1], params, use_tqdm=False)  # warms the cache with the system prompt
        rest = llm.chat(chats[1:], params, use_tqdm=False)
        results[caching] = (first + rest, llm.engine.stats.snapshot(), cached_tokens(first + rest))
        llm.engine.check_integrity()
    (on, stats_on, cached_on), (off, stats_off, cached_off) = results[True], results[False]
    assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in off]
    assert len(os.path.commonprefix([o.prompt_token_ids for o in on])) > 200
    # The later chats (one batch) reuse what the first one computed, in blocks of 16.
    computed = on[0].prompt_token_ids + on[0].outputs[0].token_ids[:-1]
    hits = [min(len(os.path.commonprefix([o.prompt_token_ids, computed])), len(o.prompt_token_ids) - 1)
            // 16 * 16 for o in on[1:]]
    assert cached_on[0] == 0 and min(hits) > 200
    assert cached_on[1:] == hits and cached_off == [0] * len(off)
    assert stats_on.prefix_cache_hits_total == sum(cached_on)
    assert stats_off.prompt_tokens_total - stats_on.prompt_tokens_total == stats_on.prefix_cache_hits_total
