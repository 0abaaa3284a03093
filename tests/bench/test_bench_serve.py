"""``bench serve`` and ``bench report`` end to end against a real server on 127.0.0.1."""

from __future__ import annotations

import json

import httpx
import pytest

from tokenloom.bench.cli import main
from tokenloom.bench.results import ServeResult
from tokenloom.bench.serve import LoadLevel, ServeTarget
from tokenloom.bench.sweep import BenchError, run_sweep
from tokenloom.bench.workloads import WorkloadSpec, build_workload
from tokenloom.engine.tokenizer import Tokenizer

INPUT_LEN, OUTPUT_LEN, NUM_PROMPTS = 24, 6, 3


def _serve_args(server, tiny_checkpoint, out, *extra: str) -> list[str]:
    return ["serve", "--base-url", f"{server.url}/v1", "--model", server.model_name,
            "--tokenizer", str(tiny_checkpoint.hf_dir), "--num-prompts", str(NUM_PROMPTS),
            "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN), "--label", "tokenloom",
            "--output-json", str(out), "--quiet", *extra]


def test_serve_sweep_writes_every_level_and_request(tiny_server, tiny_checkpoint, tmp_path):
    out, html = tmp_path / "run.json", tmp_path / "run.html"
    args = _serve_args(tiny_server, tiny_checkpoint, out, "--concurrency", "1,2", "--html", str(html))
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert data["schema"] == "tokenloom-bench-serve/1"
    assert data["label"] == "tokenloom"
    assert data["config"]["workload"]["input_len"] == INPUT_LEN
    assert data["config"]["levels"] == ["c=1", "c=2"]
    assert [(lv["concurrency"], lv["request_rate"]) for lv in data["levels"]] == [(1, None), (2, None)]
    for level in data["levels"]:
        summary = level["summary"]
        assert (summary["num_completed"], summary["num_errors"]) == (NUM_PROMPTS, 0)
        assert summary["total_prompt_tokens"] == NUM_PROMPTS * INPUT_LEN
        assert summary["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN  # ignore_eos forced every token
        assert summary["ttft_ms"]["count"] == NUM_PROMPTS
        assert set(summary["ttft_ms"]) == {"mean", "p50", "p90", "p99", "count"}
        assert len(level["requests"]) == NUM_PROMPTS
        for request in level["requests"]:
            assert (request["prompt_len"], request["output_len"], request["error"]) == (INPUT_LEN, OUTPUT_LEN, None)
            assert 1 <= len(request["chunk_times"]) <= OUTPUT_LEN
            assert request["start"] <= request["chunk_times"][0] <= request["chunk_times"][-1] <= request["end"]
    page = html.read_text()
    assert page.count("<svg") == 9 and "c=2" in page
    tiny_server.wait_idle()


def test_chat_endpoint_at_a_poisson_rate(tiny_server, tiny_checkpoint):
    target = ServeTarget(base_url=f"{tiny_server.url}/v1", model=tiny_server.model_name, endpoint="chat")
    tokenizer = Tokenizer.from_path(tiny_checkpoint.hf_dir)
    # The chat template alone is 24 tokens of the tiny vocabulary: 48 leaves room for text.
    workload = WorkloadSpec("shared-prefix", 2, 48, 4, seed=5, shared_prefix_len=16, endpoint="chat")
    result = run_sweep(target, tokenizer, workload, [LoadLevel(request_rate=50.0)], "tokenloom",
                       num_warmup=0, show_progress=False)
    (level,) = result.levels
    assert level.level.label == "rate=50/s"
    assert [r.output_len for r in level.records] == [4, 4]
    assert [r.prompt_len for r in level.records] == [16 + 48] * 2
    assert ServeResult.from_dict(json.loads(json.dumps(result.to_dict()))).levels[0].summary == level.summary
    tiny_server.wait_idle()


def test_a_refused_request_stops_the_run_at_warm_up(tiny_server, tiny_checkpoint):
    target = ServeTarget(base_url=f"{tiny_server.url}/v1", model="no-such-model")
    tokenizer = Tokenizer.from_path(tiny_checkpoint.hf_dir)
    with pytest.raises(BenchError, match="HTTP 404"):
        run_sweep(target, tokenizer, WorkloadSpec("random", 1, 8, 2), [LoadLevel(concurrency=1)], "x",
                  show_progress=False)


def test_report_puts_two_runs_side_by_side(tiny_server, tiny_checkpoint, tmp_path, capsys):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert main(_serve_args(tiny_server, tiny_checkpoint, first, "--concurrency", "1")) == 0
    assert main(_serve_args(tiny_server, tiny_checkpoint, second, "--concurrency", "1", "--seed", "1")) == 0
    data = json.loads(second.read_text())
    data["label"] = "peer"
    second.write_text(json.dumps(data))
    md, html = tmp_path / "table.md", tmp_path / "report.html"
    assert main(["report", str(first), str(second), "--markdown", str(md), "--html", str(html)]) == 0
    table = md.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| c=1 | peer |")]
    assert len(rows) == 1
    assert len(rows[0].split("|")) == 2 + 2 + 5 * 3  # level, peer, then 5 metrics x (ours, peer, ratio)
    assert "tokenloom / peer" in table
    assert html.read_text().count("<svg") == 9


def test_json_schema_response_format_constrains_every_request(tiny_server, tiny_checkpoint, tmp_path):
    from tokenloom.bench.serve import BENCH_JSON_SCHEMA

    out = tmp_path / "json.json"
    assert main(_serve_args(tiny_server, tiny_checkpoint, out, "--concurrency", "2",
                            "--response-format", "json-schema")) == 0
    summary = json.loads(out.read_text())["levels"][0]["summary"]
    # The schema asks for 64+ records, so every constrained answer still runs to --output-len.
    assert (summary["num_completed"], summary["num_errors"]) == (NUM_PROMPTS, 0)
    assert summary["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    target = ServeTarget(base_url=f"{tiny_server.url}/v1", model=tiny_server.model_name,
                         response_format="json-schema")
    [request] = build_workload(WorkloadSpec("random", 1, 8, 150), Tokenizer.from_path(tiny_checkpoint.hf_dir))
    body = target.payload(request)
    assert body["response_format"]["json_schema"]["schema"] == BENCH_JSON_SCHEMA
    body = {**body, "stream": False}
    del body["stream_options"]
    resp = httpx.post(target.url, json=body, timeout=60)
    text = resp.json()["choices"][0]["text"]
    assert "".join(text.split()).startswith('{"records":[{"id"'), text
    tiny_server.wait_idle()
