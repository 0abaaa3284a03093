"""Real servers on 127.0.0.1 for the server tests.

``start_server`` runs uvicorn in a thread of the test process around a real
engine, so a test can reach the engine (integrity checks) and hold its loop
(``StepGate``) to make queueing and disconnect scenarios deterministic.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from tokenloom import LLM
from tokenloom.engine.async_engine import AsyncLLMEngine
from tokenloom.engine.llm_engine import LLMEngine
from tokenloom.entrypoints.openai.app import build_app
from tokenloom.entrypoints.openai.server_config import ServerConfig

TINY_MODEL_NAME = "tiny"
# 256 blocks x 4 tokens hold 1024 tokens; the tiny model's context is 512.
TINY_ENGINE_OPTIONS = {"num_kv_blocks": 256, "block_size": 4}
_START_TIMEOUT_S = 60.0


class StepGate:
    """Holds the engine thread before each step until the test lets steps through.

    Open by default. ``hold()`` closes it; ``allow(n)`` lets n more steps run;
    ``release()`` opens it for good.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self._cond = threading.Condition()
        self._open = True
        self._permits = 0
        self._step = engine.step
        engine.step = self._gated_step  # the async engine's thread calls engine.step()

    def _gated_step(self):
        with self._cond:
            self._cond.wait_for(lambda: self._open or self._permits > 0)
            if not self._open:
                self._permits -= 1
        return self._step()

    def hold(self) -> None:
        with self._cond:
            self._open, self._permits = False, 0

    def allow(self, steps: int) -> None:
        with self._cond:
            self._permits += steps
            self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()


@dataclass
class LiveServer:
    engine: AsyncLLMEngine
    gate: StepGate
    server: uvicorn.Server
    thread: threading.Thread
    port: int
    model_name: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "unused", **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **options)

    def async_client(self, **options) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **options)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics: name{label="v"} -> value."""
        text = httpx.get(f"{self.url}/metrics").text
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    def wait_until(self, condition: Callable[[dict[str, float]], bool], timeout: float = 20.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            samples = self.metrics()
            if condition(samples):
                return samples
            assert time.monotonic() < deadline, "the server did not reach the expected state"
            time.sleep(0.02)

    def wait_idle(self) -> None:
        """Until nothing runs or waits and no KV block is in use; then the pool must be intact."""
        self.wait_until(lambda m: m["tokenloom:num_requests_running"] == 0
                        and m["tokenloom:num_requests_waiting"] == 0
                        and m["tokenloom:kv_cache_usage_perc"] == 0.0
                        and m["tokenloom:num_requests_queued"] == 0)
        engine = self.engine.engine
        engine.check_integrity()  # the engine thread is idle: it waits on its inbox
        assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks
        assert not engine.has_unfinished_requests()

    def stop(self) -> None:
        self.gate.release()
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def start_server(model: Path | str | LLMEngine, model_name: str = TINY_MODEL_NAME, **server_options) -> LiveServer:
    """A server around ``model``: a path (loaded with TINY_ENGINE_OPTIONS) or an idle engine to take over."""
    llm_engine = model if isinstance(model, LLMEngine) else LLMEngine.from_options(str(model), **TINY_ENGINE_OPTIONS)
    engine = AsyncLLMEngine(llm_engine)
    gate = StepGate(engine.engine)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server_options.setdefault("log_stats_interval_s", 0)
    config = ServerConfig(host="127.0.0.1", port=port, **server_options)
    app = build_app(engine, config, model_name)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    return LiveServer(engine, gate, server, thread, port, model_name)


@pytest.fixture(scope="session")
def tiny_server(tiny_checkpoint) -> Iterator[LiveServer]:
    live = start_server(tiny_checkpoint.hf_dir)
    yield live
    live.stop()


@pytest.fixture(scope="session")
def tiny_llm(tiny_checkpoint) -> LLM:
    """The offline reference: the same checkpoint and cache shape as ``tiny_server``."""
    return LLM(str(tiny_checkpoint.hf_dir), **TINY_ENGINE_OPTIONS)
