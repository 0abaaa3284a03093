"""Driving an ``EngineClient``'s streams in tests."""

from __future__ import annotations

from tokenloom.engine.client import EngineClient
from tokenloom.sampling_params import SamplingParams

LONG = SamplingParams(max_tokens=200, ignore_eos=True)


async def read_then_leave(client: EngineClient, request_id: str, prompt: str, num_deltas: int = 2) -> int:
    """Read ``num_deltas`` deltas of a long request, then close its stream (a client that
    goes away); the deltas read."""
    stream = client.generate(request_id, prompt, LONG)
    got = 0
    async for _ in stream:
        got += 1
        if got == num_deltas:
            break
    await stream.aclose()
    return got
