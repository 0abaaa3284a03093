"""Batch invariance on the default fast path: a greedy answer does not depend on
what else is in the batch or on how its prompt was chunked.

Every kernel computes a token's row with the same operations in the same order
whatever the step holds: the quantized GEMMs (activations quantized per row,
one reduction order for any number of rows), one paged attention kernel for
decodes and prompt chunks (kernels/csrc/paged_attention.cpp), per-row norms,
rotary and sampling.
"""

from __future__ import annotations

import random

import pytest

from tokenloom import LLM, SamplingParams

pytestmark = pytest.mark.slow

WORDS = ("the of and to in is was for on that with as by at from his her an which or be this are it "
         "river light stone code model paper window garden music number").split()


def _prompts(n: int = 32) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 150))) for _ in range(n)]


def _greedy(llm: LLM, prompts: list[str]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def together() -> list[list[int]]:
    return _greedy(LLM("smollm2-135m", kv_cache_memory=0.5, enable_prefix_caching=False), _prompts())


def test_alone_equals_together(together):
    llm = LLM("smollm2-135m", kv_cache_memory=0.5, enable_prefix_caching=False)
    assert llm.engine.runner.model.ops.name == "native"  # the fast path under test
    prompts = _prompts()
    assert [_greedy(llm, [p])[0] for p in prompts[:8]] == together[:8]


@pytest.mark.parametrize("budget", [7, 64, 2048])
def test_chunked_prompts_equal_whole_ones(together, budget):
    """Odd token budgets cut prompts anywhere, and a chunk of one token makes a decode-shaped step."""
    llm = LLM("smollm2-135m", kv_cache_memory=0.5, enable_prefix_caching=False, max_num_batched_tokens=budget)
    assert _greedy(llm, _prompts()) == together
