from __future__ import annotations

import json
import math

import torch

from tests.helpers.shapes import write_shape
from tokenloom import LLM
from tokenloom.bench.throughput import format_throughput, run_throughput
from tokenloom.entrypoints.cli import build_parser, main


def test_offline_throughput_counts_every_prompt_and_output_token(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint.hf_dir), num_kv_blocks=256, block_size=4)
    result = run_throughput(llm, num_prompts=3, input_len=16, output_len=5, seed=1)
    assert (result.num_prompts, result.prompt_tokens, result.output_tokens) == (3, 48, 15)
    assert result.prefill_tok_per_s > 0 and result.total_tok_per_s > 0
    assert math.isfinite(result.requests_per_s)
    assert "prefill:" in format_throughput(result) and "decode:" in format_throughput(result)
    assert not llm.engine.has_unfinished_requests()


def test_bench_throughput_takes_the_engines_device_flags():
    args = build_parser().parse_args(["bench", "throughput", "--model", "llama-3.1-8b", "--load-format", "dummy",
                                      "--device", "cuda", "--gpu-memory-utilization", "0.8"])
    assert (args.model, args.load_format, args.device, args.dtype, args.gpu_memory_utilization) == \
        ("llama-3.1-8b", "dummy", "cuda", "auto", 0.8)


def test_bench_throughput_runs_a_dummy_shape_and_records_how_it_ran(tmp_path, capsys):
    shape = write_shape(tmp_path / "tiny.json")
    out = tmp_path / "result.json"
    assert main(["bench", "throughput", "--model", str(shape), "--load-format", "dummy", "--num-prompts", "2",
                 "--input-len", "8", "--output-len", "3", "--kv-cache-memory", "0.05", "--output-json", str(out)]) == 0
    assert "decode:" in capsys.readouterr().out
    result = json.loads(out.read_text())
    resolved = ("cuda", "bfloat16", "none") if torch.cuda.is_available() else ("cpu", "float32", "auto")
    assert (result["load_format"], result["device"], result["dtype"], result["quantization"]) == \
        ("dummy", *resolved)  # the auto device and dtype as they were resolved
    assert (result["num_prompts"], result["output_tokens"]) == (2, 6)


def test_bench_throughput_takes_a_speculative_config(tmp_path, capsys):
    shape = write_shape(tmp_path / "tiny.json")
    base = ["bench", "throughput", "--model", str(shape), "--load-format", "dummy", "--num-prompts", "2",
            "--input-len", "8", "--output-len", "3", "--kv-cache-memory", "0.05"]
    assert main([*base, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']) == 0
    assert "decode:" in capsys.readouterr().out
    assert main([*base, "--speculative-config", '{"method": "ngram"}']) == 2
    assert "'num_speculative_tokens' is required" in capsys.readouterr().err


def test_offline_levels_keep_the_concurrency_and_time_every_token(tiny_checkpoint):
    from tokenloom.bench.offline_sweep import run_offline_sweep
    from tokenloom.bench.results import ServeResult
    from tokenloom.bench.workloads import WorkloadSpec

    llm = LLM(str(tiny_checkpoint.hf_dir), num_kv_blocks=256, block_size=4)
    steps = []
    step = llm.engine.step
    llm.engine.step = lambda: steps.append(llm.engine.scheduler.num_running) or step()
    workload = WorkloadSpec("random", num_prompts=5, input_len=12, output_len=6, seed=3)
    result = run_offline_sweep(llm.engine, workload, [1, 3], "offline", show_progress=False)
    assert [lv.level.concurrency for lv in result.levels] == [1, 3]
    assert max(steps) == 3  # never more in flight than the level's concurrency
    for level in result.levels:
        assert sorted(r.prompt_index for r in level.records) == [0, 1, 2, 3, 4]
        assert all(r.ok and r.output_len == 6 and len(r.chunk_times) == 6 for r in level.records)
        assert level.summary.num_completed == 5 and level.summary.tpot_ms.count == 5
    assert ServeResult.from_dict(result.to_dict()).levels[1].summary == result.levels[1].summary
    assert not llm.engine.has_unfinished_requests()


def test_bench_throughput_with_levels_writes_a_serve_result(tmp_path, capsys):
    from tokenloom.bench.results import ServeResult

    shape = write_shape(tmp_path / "tiny.json")
    out = tmp_path / "levels.json"
    assert main(["bench", "throughput", "--model", str(shape), "--load-format", "dummy", "--num-prompts", "3",
                 "--input-len", "200", "--output-len", "4", "--concurrency", "1,2", "--kv-cache-memory", "0.05",
                 "--output-json", str(out)]) == 0
    assert "c=2" in capsys.readouterr().out
    result = ServeResult.load(out)
    assert result.label == "tokenloom-offline" and result.config["offline"] is True
    assert [lv.summary.num_completed for lv in result.levels] == [3, 3]
    assert all(r.prompt_len >= 200 and r.output_len == 4 for lv in result.levels for r in lv.records)
