"""EngineCoreClient: the engine loop in its own process, streams on this process's event loop.

The core runs with TOKENLOOM_DEBUG=1, so it checks every KV invariant whenever it goes
idle; a failed check would end its loop, and the next test's request would fail.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tests.helpers.streams import read_then_leave
from tokenloom import LLM, SamplingParams
from tokenloom.engine.client import EngineDeadError
from tokenloom.engine.core_client import EngineCoreClient
from tokenloom.engine.llm_engine import build_engine_config
from tokenloom.sampling_params import InvalidParameter

PROMPTS = ["The cat sat on the mat", "def add(a, b):", "1 2 3 4 5", "hello there"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
OPTIONS = {"num_kv_blocks": 128, "block_size": 4}


class Served:
    """A launched client and the one event loop its streams live on."""

    def __init__(self, model: str) -> None:
        previous = os.environ.get("TOKENLOOM_DEBUG")
        os.environ["TOKENLOOM_DEBUG"] = "1"  # the spawned core inherits it
        try:
            self.client = EngineCoreClient.launch(build_engine_config(model, **OPTIONS))
        finally:
            if previous is None:
                del os.environ["TOKENLOOM_DEBUG"]
            else:
                os.environ["TOKENLOOM_DEBUG"] = previous
        self.loop = asyncio.new_event_loop()
        self.run(self._start())

    async def _start(self) -> None:
        self.client.start()

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.client.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    served = Served(str(tiny_checkpoint.hf_dir))
    yield served
    served.close()
    assert not served.client.is_alive
    assert served.client.process.exitcode == 0


async def collect(client: EngineCoreClient, request_id: str, prompt: str | list[int], params: SamplingParams):
    ids, deltas, last = [], 0, None
    async for out in client.generate(request_id, prompt, params):
        deltas += 1
        ids += out.outputs[0].token_ids
        last = out
    assert last is not None and last.finished
    return ids, deltas, last


def test_concurrent_streams_equal_offline_greedy(served, tiny_checkpoint):
    async def run():
        return await asyncio.gather(*(collect(served.client, f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)))

    results = served.run(run())
    offline = LLM(str(tiny_checkpoint.hf_dir), **OPTIONS).generate(PROMPTS, GREEDY, use_tqdm=False)
    for (ids, deltas, last), ref in zip(results, offline):
        assert ids == ref.outputs[0].token_ids
        assert deltas == 16  # one delta per decoded token
        assert last.outputs[0].finish_reason == "length"
        assert last.prompt == ref.prompt and last.prompt_token_ids == ref.prompt_token_ids  # restored here
    stats = served.client.stats.snapshot()
    assert stats.generation_tokens_total >= 4 * 16 and stats.num_running == 0


def test_leaving_a_stream_early_aborts_and_frees_blocks(served):
    async def read_two_then_leave():
        got = await read_then_leave(served.client, "leaver", PROMPTS[0])
        assert served.client.stats.snapshot().kv_cache_usage > 0
        while served.client.stats.snapshot().kv_cache_usage > 0:  # the core's next message says so
            await asyncio.sleep(0.01)
        return got

    assert served.run(asyncio.wait_for(read_two_then_leave(), 10)) == 2
    ids, _, _ = served.run(collect(served.client, "after", PROMPTS[1], GREEDY))  # the core's checks passed
    assert len(ids) == 16 and served.client.is_alive


def test_invalid_requests_fail_their_caller_before_reaching_the_core(served):
    async def run():
        with pytest.raises(InvalidParameter) as err:
            async for _ in served.client.generate("bad", "hi", SamplingParams(temperature=-1)):
                pass
        assert err.value.field_name == "temperature"
        with pytest.raises(InvalidParameter, match="out of vocabulary"):
            await served.client.generate("bad-ids", [10**6], GREEDY).__anext__()
        return await collect(served.client, "good", PROMPTS[2], GREEDY)

    ids, _, _ = served.run(run())
    assert len(ids) == 16 and served.client.is_alive


def test_a_model_that_cannot_load_raises_the_cores_own_error():
    with pytest.raises(ValueError, match="not an existing path"):
        EngineCoreClient.launch(build_engine_config("no-such-model"))


def test_a_dead_core_fails_every_stream_and_the_client(tiny_checkpoint):
    served = Served(str(tiny_checkpoint.hf_dir))

    async def run():
        stream = served.client.generate("long", PROMPTS[3], SamplingParams(max_tokens=400, ignore_eos=True))
        await stream.__anext__()
        os.kill(served.client.process.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="engine core is gone"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await served.client.generate("next", PROMPTS[0], GREEDY).__anext__()

    try:
        served.run(asyncio.wait_for(run(), 30))
        assert not served.client.is_alive
    finally:
        served.close()
