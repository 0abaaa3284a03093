"""How the engine's options reach the graph runner: CUDA graphs of decode steps are
built on CUDA only, and not with enforce_eager or tensor parallelism."""

from __future__ import annotations

import pytest
import torch

from tokenloom.engine.llm_engine import LLMEngine, _cudagraph_sizes, build_engine_config
from tokenloom.entrypoints.cli import build_parser, engine_config_from_args
from tokenloom.runner.graph_buckets import capture_sizes


def test_options_map_to_the_model_config():
    config = build_engine_config("m.gguf", enforce_eager=True, max_cudagraph_batch_size=64)
    assert (config.model.enforce_eager, config.model.max_cudagraph_batch_size) == (True, 64)
    default = build_engine_config("m.gguf").model
    assert (default.enforce_eager, default.max_cudagraph_batch_size) == (False, 512)
    with pytest.raises(ValueError, match="max_cudagraph_batch_size must be > 0, got -3"):
        build_engine_config("m.gguf", max_cudagraph_batch_size=-3).validate()


def test_cli_flags_map_to_the_model_config(capsys):
    parser = build_parser()
    args = parser.parse_args(["serve", "m.gguf", "--enforce-eager", "--max-cudagraph-batch-size", "32"])
    model = engine_config_from_args(args, parser).model
    assert (model.enforce_eager, model.max_cudagraph_batch_size) == (True, 32)
    model = engine_config_from_args(parser.parse_args(["chat", "m.gguf"]), parser).model
    assert (model.enforce_eager, model.max_cudagraph_batch_size) == (False, 512)
    with pytest.raises(SystemExit):
        engine_config_from_args(parser.parse_args(["serve", "--max-cudagraph-batch-size", "0"]), parser)
    assert "max_cudagraph_batch_size must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("device, options, expected", [
    ("cuda", {}, capture_sizes(256, 512)),
    ("cuda", {"max_num_seqs": 40, "max_cudagraph_batch_size": 16}, (1, 2, 4, 8, 16)),
    ("cuda", {"enforce_eager": True}, ()),
    ("cuda", {"tensor_parallel_size": 2}, ()),  # every rank would have to replay in lockstep
    ("cpu", {}, ()),  # the CPU would pay for the padding
])
def test_graph_sizes_by_device_and_options(device, options, expected):
    config = build_engine_config("m.gguf", device=device, **options)
    assert _cudagraph_sizes(config, torch.device(device)) == expected


def test_the_cpu_engine_has_no_graph_runner(tiny_checkpoint):
    engine = LLMEngine.from_options(model=str(tiny_checkpoint.hf_dir), device="cpu", num_kv_blocks=64)
    assert engine.runner.graphs is None
