"""AsyncLLMEngine: streams of deltas, early exit aborts, errors stay with their caller."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.helpers.streams import read_then_leave
from tokenloom import LLM, SamplingParams
from tokenloom.engine.async_engine import AsyncLLMEngine
from tokenloom.engine.llm_engine import LLMEngine
from tokenloom.sampling_params import InvalidParameter

PROMPTS = ["The cat sat on the mat", "def add(a, b):", "1 2 3 4 5", "hello there"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def async_engine(tiny_checkpoint):
    engine = AsyncLLMEngine(LLMEngine.from_options(str(tiny_checkpoint.hf_dir), num_kv_blocks=128,
                                                   block_size=4))
    engine.start()
    yield engine
    engine.shutdown()
    assert not engine.is_alive


async def collect(engine: AsyncLLMEngine, request_id: str, prompt: str, params: SamplingParams):
    text, ids, deltas = "", [], 0
    async for out in engine.generate(request_id, prompt, params):
        deltas += 1
        text += out.outputs[0].text
        ids += out.outputs[0].token_ids
        last = out
    assert last.finished
    return text, ids, deltas, last.outputs[0].finish_reason


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_concurrent_streams_equal_offline_greedy(async_engine, tiny_checkpoint):
    async def run():
        return await asyncio.gather(*(collect(async_engine, f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)))

    results = asyncio.run(run())
    offline = LLM(str(tiny_checkpoint.hf_dir), num_kv_blocks=128, block_size=4).generate(
        PROMPTS, GREEDY, use_tqdm=False)
    for (text, ids, deltas, reason), ref in zip(results, offline):
        assert ids == ref.outputs[0].token_ids
        assert text == ref.outputs[0].text
        assert deltas == 16  # one delta per decoded token
        assert reason == "length"


def test_leaving_a_stream_early_aborts_and_frees_blocks(async_engine):
    engine = async_engine.engine
    assert asyncio.run(read_then_leave(async_engine, "leaver", PROMPTS[0])) == 2
    wait_until(lambda: not engine.has_unfinished_requests())
    wait_until(lambda: engine.kv_manager.pool.num_used_blocks == 0)
    assert async_engine.is_alive


def test_invalid_request_fails_its_caller_only(async_engine):
    async def run():
        with pytest.raises(InvalidParameter) as err:
            async for _ in async_engine.generate("bad", "hi", SamplingParams(temperature=-1)):
                pass
        assert err.value.field_name == "temperature"
        return await collect(async_engine, "good", PROMPTS[1], GREEDY)

    _, ids, _, _ = asyncio.run(run())
    assert len(ids) == 16
    assert async_engine.is_alive


def test_duplicate_request_id_is_rejected(async_engine):
    async def run():
        first = async_engine.generate("dup", PROMPTS[2], SamplingParams(max_tokens=50, ignore_eos=True))
        await first.__anext__()
        with pytest.raises(ValueError, match="already running"):
            await async_engine.generate("dup", PROMPTS[2], GREEDY).__anext__()
        await first.aclose()

    asyncio.run(run())
    wait_until(lambda: async_engine.engine.kv_manager.pool.num_used_blocks == 0)
