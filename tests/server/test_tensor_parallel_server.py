"""The default model split over 2 tensor-parallel ranks, served over HTTP: the exact
path's greedy text of one rank; a dead rank turns /health to 503 within seconds; no
process outlives the server. And torchrun's launch (env://) serves too."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.engine.test_tensor_parallel import child_pids, wait_for_no_children
from tests.helpers.tensor_parallel import REPO
from tests.server.conftest import LiveServer, start_server
from tokenloom import LLM, SamplingParams
from tokenloom.engine.llm_engine import LLMEngine

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Water boils at"]
GREEDY = SamplingParams(temperature=0, max_tokens=32)
EXACT = {"quantization": "none", "dtype": "float32", "max_model_len": 1024, "kv_cache_memory": 0.1}


@pytest.fixture(scope="module")
def references(default_model_path) -> dict[str, list[str]]:
    llm = LLM(str(default_model_path), **EXACT)
    return {"chat": [o.outputs[0].text for o in llm.chat(QUESTION, GREEDY, use_tqdm=False)],
            "completions": [o.outputs[0].text for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]}


@pytest.fixture
def split_server(default_model_path) -> Iterator[LiveServer]:
    before = child_pids()
    engine = LLMEngine.from_options(str(default_model_path), tensor_parallel_size=2, **EXACT)
    live = start_server(engine, model_name="smollm2-135m")
    yield live
    live.stop()
    wait_for_no_children(before)  # the server's shutdown ended rank 1


def test_two_ranks_over_http_give_the_greedy_text_of_one(split_server, references):
    """SmolLM2's 9 q heads over 3 kv heads split 3 / 6 (1 and 2 kv heads)."""
    client = split_server.client()
    chat = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, temperature=0, max_tokens=32)
    assert [chat.choices[0].message.content] == references["chat"]
    completions = client.completions.create(model="smollm2-135m", prompt=PROMPTS, temperature=0, max_tokens=32)
    assert [c.text for c in completions.choices] == references["completions"]
    assert "100" in completions.choices[2].text  # a working model, not two equal wrong ones
    streamed = client.completions.create(model="smollm2-135m", prompt=PROMPTS[0], temperature=0, max_tokens=32,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == references["completions"][0]
    split_server.wait_idle()


def test_a_dead_rank_turns_health_to_503_within_seconds(split_server):
    assert httpx.get(f"{split_server.url}/health").status_code == 200
    split_server.engine.engine.tp.ranks.processes[1].kill()
    deadline = time.monotonic() + 5
    while (health := httpx.get(f"{split_server.url}/health")).status_code == 200:
        assert time.monotonic() < deadline, "/health still says 200"
        time.sleep(0.05)
    assert health.status_code == 503
    assert "tensor-parallel rank 1" in health.json()["error"]["message"]
    with pytest.raises(openai.APIStatusError) as error:
        split_server.client().completions.create(model="smollm2-135m", prompt="hi", max_tokens=4)
    assert error.value.status_code == 503


def test_torchrun_starts_the_ranks_and_rank_0_serves(default_model_path, references):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    serve = ["-m", "tokenloom.entrypoints.cli", "serve", str(default_model_path), "-tp", "2", "--port", str(port),
             "--served-model-name", "smollm2-135m", "--quantization", "none", "--max-model-len", "1024",
             "--kv-cache-memory", "0.1", "--log-level", "warning"]
    process = subprocess.Popen(torchrun + serve, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "the torchrun server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        completions = client.completions.create(model="smollm2-135m", prompt=PROMPTS, temperature=0, max_tokens=32)
        assert [c.text for c in completions.choices] == references["completions"]
    finally:
        process.terminate()
        process.wait(timeout=30)
