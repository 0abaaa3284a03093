"""32 streams at once: all complete, each equal to the prompt's greedy output alone."""

from __future__ import annotations

import asyncio

from tokenloom import SamplingParams

WORDS = ("river valley mill bridge winter frost orchard kettle wizard potion zebra fox "
         "model token block cache").split()
PROMPTS = [f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]} " * (1 + i % 5) + str(i) for i in range(32)]
MAX_TOKENS = 10


def test_32_concurrent_streams_equal_their_solo_greedy_outputs(tiny_server, tiny_llm):
    async def stream_one(client, prompt: str) -> tuple[str, str | None]:
        text, finish = "", None
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
        return text, finish

    async def run_all() -> list[tuple[str, str | None]]:
        async with tiny_server.async_client(timeout=60) as client:
            return await asyncio.gather(*(stream_one(client, p) for p in PROMPTS))

    results = asyncio.run(run_all())
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    solo = [tiny_llm.generate(p, params, use_tqdm=False)[0].outputs[0].text for p in PROMPTS]
    assert [text for text, _ in results] == solo
    assert [finish for _, finish in results] == ["length"] * len(PROMPTS)
    tiny_server.wait_idle()
