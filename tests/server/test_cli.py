"""``tokenloom serve`` and ``tokenloom chat`` as a user runs them: real processes."""

from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tokenloom import SamplingParams
from tokenloom.entrypoints.chat_cli import HELP, PROMPT
from tokenloom.entrypoints.cli import build_parser, engine_config_from_args, server_config_from_args

CLI = [sys.executable, "-m", "tokenloom.entrypoints.cli"]
SECRET_PROMPT = "zebras jumped over lazy yellow foxes"
SERVE_FLAGS = ("--host", "--port", "--served-model-name", "--api-key", "--dtype", "--device", "--seed",
               "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--kv-cache-memory",
               "--block-size", "--no-prefix-caching", "--max-queued-requests", "--allowed-origins",
               "--log-level", "--max-request-bytes", "--log-prompts", "--log-stats-interval", "--tool-call-parser",
               "--load-format", "--gpu-memory-utilization", "--quantization", "--speculative-config")


def test_console_script_points_at_main():
    [script] = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "tokenloom"]
    assert script.value == "tokenloom.entrypoints.cli:main"


def test_serve_help_explains_every_flag():
    out = subprocess.run([*CLI, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in SERVE_FLAGS:
        assert flag in out


def test_flags_map_to_configs(monkeypatch):
    monkeypatch.setenv("TOKENLOOM_API_KEY", "from-env")
    parser = build_parser()
    args = parser.parse_args(["serve", "m.gguf", "--no-prefix-caching", "--allowed-origins", "http://a, http://b",
                              "--max-queued-requests", "7", "--block-size", "8", "--max-num-seqs", "3"])
    server = server_config_from_args(args)
    assert (server.api_key, server.allowed_origins, server.max_queued_requests) == \
        ("from-env", ("http://a", "http://b"), 7)
    engine = engine_config_from_args(args, parser)
    assert engine.cache.enable_prefix_caching is False
    assert (engine.model.model, engine.cache.block_size, engine.scheduler.max_num_seqs) == ("m.gguf", 8, 3)
    assert server_config_from_args(parser.parse_args(["serve", "--api-key", "flag"])).api_key == "flag"
    assert server.tool_call_parser == "auto"
    parsed = parser.parse_args(["serve", "--tool-call-parser", "llama3_json"])
    assert server_config_from_args(parsed).tool_call_parser == "llama3_json"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--tool-call-parser", "no-such-format"])


def test_speculative_config_flag(capsys):
    parser = build_parser()
    args = parser.parse_args(["serve", "m.gguf", "--speculative-config",
                              '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}'])
    spec = engine_config_from_args(args, parser).speculative
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_max, spec.prompt_lookup_min) == \
        ("ngram", 3, 5, 2)
    assert engine_config_from_args(parser.parse_args(["serve", "m.gguf"]), parser).speculative is None
    with pytest.raises(SystemExit):
        engine_config_from_args(parser.parse_args(
            ["serve", "--speculative-config", '{"method": "medusa", "num_speculative_tokens": 3}']), parser)
    assert "method must be one of ('ngram', 'draft_model'), got 'medusa'" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["-tp", "0"], "tensor_parallel_size must be an integer >= 1, got 0"),
    (["-tp", "3", "--nnodes", "2"], r"nnodes \(2\) must be >= 1 and divide tensor_parallel_size \(3\)"),
    (["-tp", "2", "--nnodes", "2"], "more than one node needs distributed_init_method"),
    (["-tp", "2", "--node-rank", "1"], r"node_rank must be in \[0, 0\], got 1"),
    (["-tp", "2", "--distributed-init-method", "udp://h:1"], "must be tcp://HOST:PORT or env://"),
])
def test_tensor_parallel_flags_are_checked_with_the_config(capsys, flags, message):
    parser = build_parser()
    with pytest.raises(SystemExit):
        engine_config_from_args(parser.parse_args(["serve", "m.gguf", *flags]), parser)
    assert re.search(message, capsys.readouterr().err)


def test_tensor_parallel_flags_map_to_the_parallel_config():
    parser = build_parser()
    assert engine_config_from_args(parser.parse_args(["serve"]), parser).parallel.tensor_parallel_size == 1
    args = parser.parse_args(["serve", "m.gguf", "--tensor-parallel-size", "4", "--nnodes", "2", "--node-rank", "1",
                              "--distributed-init-method", "tcp://10.0.0.1:29500"])
    parallel = engine_config_from_args(args, parser).parallel
    assert (parallel.tensor_parallel_size, parallel.nnodes, parallel.node_rank, parallel.distributed_init_method,
            parallel.ranks_per_node) == (4, 2, 1, "tcp://10.0.0.1:29500", 2)


def test_device_flags_default_to_auto_and_map_to_configs():
    parser = build_parser()
    default = engine_config_from_args(parser.parse_args(["serve"]), parser)
    assert (default.model.device, default.model.dtype, default.model.load_format) == ("auto", "auto", "auto")
    assert default.cache.gpu_memory_utilization == 0.9
    args = parser.parse_args(["serve", "llama-3.1-8b", "--load-format", "dummy", "--device", "cuda",
                              "--dtype", "float16", "--gpu-memory-utilization", "0.6", "--seed", "4"])
    engine = engine_config_from_args(args, parser)
    assert (engine.model.model, engine.model.load_format, engine.model.device, engine.model.dtype,
            engine.model.seed, engine.cache.gpu_memory_utilization) == ("llama-3.1-8b", "dummy", "cuda", "float16",
                                                                        4, 0.6)
    for bad in (["--load-format", "pt"], ["--dtype", "float64"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", *bad])
    with pytest.raises(SystemExit):  # validated with the config: a share of the GPU
        engine_config_from_args(parser.parse_args(["serve", "--gpu-memory-utilization", "1.5"]), parser)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(url: str, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, "the server exited"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


def test_serve_enforces_the_api_key_and_keeps_prompts_out_of_logs(tiny_checkpoint):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "TOKENLOOM_API_KEY"}
    process = subprocess.Popen([*CLI, "serve", str(tiny_checkpoint.gguf_path), "--port", str(port),
                                "--api-key", "s3cret", "--served-model-name", "tiny", "--kv-cache-memory", "0.01"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_for_health(url, process)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        resp = client.completions.create(model="tiny", prompt=SECRET_PROMPT, max_tokens=3)
        assert httpx.get(f"{url}/metrics").status_code == 200  # operational routes stay open
    finally:
        process.send_signal(signal.SIGINT)
        log, _ = process.communicate(timeout=60)
    assert process.returncode == 0, log
    assert f"request {resp.id}" in log
    assert SECRET_PROMPT not in log


def test_chat_streams_replies_and_resets(tiny_checkpoint, tiny_llm):
    script = "hello\n/reset\nhello\nand again\n/exit\n"
    out = subprocess.run([*CLI, "chat", str(tiny_checkpoint.gguf_path), "--temperature", "0", "--max-tokens", "8",
                          "--kv-cache-memory", "0.01"], input=script, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    params = SamplingParams(temperature=0, top_p=0.9, max_tokens=8)
    first = [{"role": "user", "content": "hello"}]
    reply = tiny_llm.chat(first, params, use_tqdm=False)[0].outputs[0].text
    follow_up = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and again"}]
    reply2 = tiny_llm.chat(follow_up, params, use_tqdm=False)[0].outputs[0].text
    assert out.stdout == (f"{HELP}\n{PROMPT}{reply}\n{PROMPT}[conversation cleared]\n{PROMPT}{reply}\n"
                          f"{PROMPT}{reply2}\n{PROMPT}")


def _startup_failure(*args: str) -> str:
    out = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    errors = [line for line in out.stderr.splitlines() if " INFO " not in line]
    assert len(errors) == 1 and errors[0].startswith("tokenloom: "), out.stderr  # one line, no traceback
    return errors[0]


def test_startup_errors_are_one_clear_line(tmp_path, tiny_checkpoint):
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    assert "neither a .gguf file nor a Hugging Face model directory" in _startup_failure("serve", str(text))
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(tiny_checkpoint.gguf_path.read_bytes()[:3000])
    assert "truncated" in _startup_failure("serve", str(truncated))
    assert "no tokenizer.json" in _startup_failure("chat", str(tmp_path))
    assert "not an existing path" in _startup_failure("serve", "no-such-model")


def test_a_kv_cache_larger_than_the_memory_is_refused_with_both_numbers(tiny_checkpoint):
    line = _startup_failure("serve", str(tiny_checkpoint.hf_dir), "--kv-cache-memory", "100000")
    assert "100000.0 GiB" in line and "GiB of memory is available" in line and "--kv-cache-memory" in line


def test_tensor_parallel_ranks_that_cannot_meet_are_one_clear_line(tiny_checkpoint):
    with socket.socket() as taken:  # the rendezvous port is in use by something else
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _startup_failure("serve", str(tiny_checkpoint.hf_dir), "-tp", "2", "--distributed-init-method",
                                f"tcp://127.0.0.1:{port}")
    assert f"the tensor-parallel ranks could not meet at tcp://127.0.0.1:{port}" in line and "in use" in line


def test_sigterm_to_the_whole_process_group_stops_the_server_and_its_engine_core_cleanly(tiny_checkpoint):
    """systemd and `timeout` signal every process: the engine core leaves the shutdown to
    the server, which stops it after the lifespan's end, so nothing dies mid-stream."""
    port = free_port()
    process = subprocess.Popen([*CLI, "serve", str(tiny_checkpoint.gguf_path), "--port", str(port),
                                "--kv-cache-memory", "0.01"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        wait_for_health(f"http://127.0.0.1:{port}", process)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        log, _ = process.communicate(timeout=60)
    assert process.returncode == 0, log
    assert "engine core is gone" not in log and "Application shutdown complete" in log
