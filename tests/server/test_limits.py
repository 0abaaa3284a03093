"""Body limit, queue limit, disconnects, dead engine and CORS on a real server.

The tests hold the engine loop with ``StepGate`` so that "queued", "mid-stream"
and "before the first token" are states the test sets up, not timing luck.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import LiveServer, start_server

CHAT = [{"role": "user", "content": "Tell me a long story."}]
LONG = {"messages": CHAT, "max_tokens": 400, "ignore_eos": True, "temperature": 0}
ABORTS = 'tokenloom:request_success_total{finished_reason="abort"}'
GENERATED = "tokenloom:generation_tokens_total"


@pytest.fixture(scope="module")
def limited(tiny_checkpoint) -> Iterator[LiveServer]:
    live = start_server(tiny_checkpoint.gguf_path, max_queued_requests=2, max_request_bytes=4096,
                        allowed_origins=("http://example.test",))
    yield live
    live.stop()


def open_stream(server: LiveServer, body: dict) -> tuple[httpx.Client, httpx.Response, Iterator[dict]]:
    """A streamed chat request whose headers (and role chunk) have arrived."""
    client = httpx.Client(base_url=server.url, timeout=30)
    resp = client.send(client.build_request("POST", "/v1/chat/completions", json={**body, "stream": True}),
                       stream=True)
    assert resp.status_code == 200
    events = (json.loads(line[len("data: "):]) for line in resp.iter_lines()
              if line.startswith("data: ") and line != "data: [DONE]")
    first = next(events)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    return client, resp, events


def close_stream(client: httpx.Client, resp: httpx.Response) -> None:
    resp.close()
    client.close()


def aborts(server: LiveServer) -> float:
    return server.metrics().get(ABORTS, 0.0)


def test_body_over_the_limit_is_413(limited):
    big = {"prompt": "x" * 5000}
    resp = httpx.post(f"{limited.url}/v1/completions", json=big)
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit trips while reading
        yield json.dumps(big).encode()

    resp = httpx.post(f"{limited.url}/v1/completions", content=chunked(),
                      headers={"content-type": "application/json"})
    assert resp.status_code == 413
    ok = httpx.post(f"{limited.url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200


def test_full_queue_is_429_with_retry_after(limited):
    limited.gate.hold()  # nothing gets a first token, so every request stays queued
    streams = [open_stream(limited, LONG) for _ in range(2)]
    try:
        assert limited.metrics()["tokenloom:num_requests_queued"] == 2
        resp = httpx.post(f"{limited.url}/v1/chat/completions", json={"messages": CHAT}, timeout=30)
        assert resp.status_code == 429
        assert resp.headers["retry-after"] == "1"
        assert resp.json()["error"]["type"] == "rate_limit_error"
    finally:
        limited.gate.release()
        for client, resp, _ in streams:
            close_stream(client, resp)
    limited.wait_idle()


def test_disconnect_mid_stream_aborts_and_frees_blocks(limited):
    before = limited.metrics()
    limited.gate.hold()
    client, resp, events = open_stream(limited, {**LONG, "logprobs": True})  # logprobs: a chunk per token
    limited.gate.allow(3)
    tokens = [next(events)["choices"][0]["logprobs"]["content"] for _ in range(3)]
    assert [len(t) for t in tokens] == [1, 1, 1]
    close_stream(client, resp)
    limited.wait_until(lambda m: m.get(ABORTS, 0.0) == before.get(ABORTS, 0.0) + 1)
    limited.gate.release()
    limited.wait_idle()
    # Three steps ran, plus at most the one the gate held when the abort came: never the 400.
    assert limited.metrics()[GENERATED] - before[GENERATED] <= 4


def test_disconnect_before_the_first_token_aborts(limited):
    before = limited.metrics()
    limited.gate.hold()
    client, resp, _ = open_stream(limited, LONG)
    assert limited.metrics()["tokenloom:num_requests_queued"] == 1
    close_stream(client, resp)
    limited.wait_until(lambda m: m.get(ABORTS, 0.0) == before.get(ABORTS, 0.0) + 1
                       and m["tokenloom:num_requests_queued"] == 0)
    limited.gate.release()
    limited.wait_idle()
    assert limited.metrics()[GENERATED] - before[GENERATED] <= 1


def test_disconnect_of_a_non_streamed_request_aborts(limited):
    before = limited.metrics()
    limited.gate.hold()
    failures: list[BaseException] = []

    def request() -> None:
        try:
            httpx.post(f"{limited.url}/v1/chat/completions", json=LONG, timeout=0.5)
        except httpx.TimeoutException as exc:  # the client gives up and closes the connection
            failures.append(exc)

    thread = threading.Thread(target=request)
    thread.start()
    thread.join(timeout=30)
    assert len(failures) == 1
    limited.wait_until(lambda m: m.get(ABORTS, 0.0) == before.get(ABORTS, 0.0) + 1)
    limited.gate.release()
    limited.wait_idle()
    assert limited.metrics()[GENERATED] - before[GENERATED] <= 1


def test_cors_only_for_allowed_origins(limited, tiny_server):
    preflight = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
    allowed = httpx.options(f"{limited.url}/v1/chat/completions", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "http://example.test"
    other = httpx.options(f"{limited.url}/v1/chat/completions", headers={**preflight, "Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in other.headers
    default = httpx.get(f"{tiny_server.url}/v1/models", headers={"Origin": "http://example.test"})
    assert "access-control-allow-origin" not in default.headers


def test_a_dead_engine_is_503_with_retry_after(tiny_checkpoint):
    live = start_server(tiny_checkpoint.gguf_path)
    try:
        assert httpx.get(f"{live.url}/health").status_code == 200
        live.engine.shutdown()  # the loop is gone, the HTTP server is not
        health = httpx.get(f"{live.url}/health")
        assert health.status_code == 503 and "retry-after" in health.headers
        resp = httpx.post(f"{live.url}/v1/completions", json={"prompt": "x"})
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "5"
        assert resp.json()["error"]["code"] == "engine_unavailable"
    finally:
        live.stop()
