"""``tokenloom serve [MODEL]`` (the OpenAI-compatible server), ``tokenloom chat [MODEL]`` and
``tokenloom bench serve|throughput|report`` (see tokenloom.bench).

MODEL is a ``.gguf`` file, a Hugging Face directory, or a known alias
(default ``smollm2-135m``, fetched once into ``$TOKENLOOM_HOME``); with
``--load-format dummy`` (random weights) also a config.json or a shape shipped in
benchmarks/shapes (``llama-3.1-8b`` ...).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from tokenloom.bench.cli import add_bench_subcommands
from tokenloom.config import DEFAULT_MAX_CUDAGRAPH_BATCH_SIZE, KV_CACHE_DTYPES, EngineConfig
from tokenloom.entrypoints.load_args import add_load_args, load_options
from tokenloom.entrypoints.openai.server_config import (
    DEFAULT_MAX_QUEUED_REQUESTS,
    DEFAULT_MAX_REQUEST_BYTES,
    ServerConfig,
)
from tokenloom.entrypoints.openai.tool_parsers import TOOL_PARSERS

DEFAULT_MODEL = "smollm2-135m"
API_KEY_ENV = "TOKENLOOM_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "bench":
        from tokenloom.bench.cli import run_bench

        return run_bench(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = engine_config_from_args(args, parser)
        if config.parallel.tensor_parallel_size > 1 and _run_as_worker(config):
            return 0
        if args.command == "serve":
            return _serve(args, parser, config)
        from tokenloom.entrypoints.chat_cli import run_chat

        return run_chat(config, args)
    except (ValueError, OSError) as exc:
        # Startup failures a user can fix: no such model, not a model file, an unreadable or
        # truncated file, an unknown architecture, a KV cache larger than the memory, a port in
        # use. One line, no traceback (--log-level debug shows it).
        logging.getLogger("tokenloom").debug("%s failed", args.command, exc_info=exc)
        print(f"tokenloom: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenloom", description="A fast LLM inference engine and "
                                     "OpenAI-compatible server on PyTorch.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                                description="Serve MODEL over an OpenAI-compatible HTTP API "
                                "(/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics ...).")
    _add_engine_args(serve)
    _add_server_args(serve)
    chat = commands.add_parser("chat", help="chat with a model in the terminal",
                               description="An interactive chat with streaming output. "
                               "Commands: /reset clears the conversation, /exit quits.")
    _add_engine_args(chat)
    _add_chat_args(chat)
    chat.set_defaults(log_level="warning")  # log lines would interleave with the conversation
    add_bench_subcommands(commands)
    return parser


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="a .gguf file, a Hugging Face model directory, or a known alias; with --load-format "
                   "dummy also a config.json or a shipped shape (default: %(default)s)")
    add_load_args(p)
    p.add_argument("--seed", type=int, default=0,
                   help="seed for model initialisation, dummy weights included (default: %(default)s)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length (prompt + output); default: the model's, capped by the KV cache")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one batch (default: %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one engine step (default: 512 on the CPU, 2048 on CUDA)")
    p.add_argument("--kv-cache-memory", type=float, default=None,
                   help="GiB of memory for the KV cache; default: on the CPU a quarter of free RAM, within "
                   "[0.25, 4], on CUDA what --gpu-memory-utilization leaves")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="element type of the KV cache; int8 quantizes each token's head row with its own "
                   "scale (like llama.cpp's -ctk q8_0); fp8 casts to float8 e4m3 (vLLM's fp8 cache, for "
                   "CUDA; on the CPU it takes the slow PyTorch path); auto: int8 when the weights run "
                   "quantized (the native kernels read it), else the model dtype (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=16,
                   help="tokens per KV cache block, a power of two (default: %(default)s)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV cache of prompt prefixes shared between requests")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help="speculative decoding, vLLM's JSON: {\"method\": \"ngram\", \"num_speculative_tokens\": "
                   "5, \"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2} or {\"method\": \"draft_model\", "
                   "\"model\": PATH_OR_ALIAS, \"num_speculative_tokens\": 4}; optional \"disable_by_batch_size\" "
                   "(default 4: no speculation when more sequences run, where on a CPU it stops paying); off when not given")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run every step eagerly: no CUDA graphs for decode steps (the CPU never uses them)")
    p.add_argument("--max-cudagraph-batch-size", type=int, default=DEFAULT_MAX_CUDAGRAPH_BATCH_SIZE,
                   help="largest decode batch (sequences) replayed as a CUDA graph; larger ones run eagerly "
                   "(default: %(default)s, capped by --max-num-seqs)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="plan step N+1 while the device runs step N (default: on with CUDA, off on the CPU, "
                   "where the host runs the step itself; never with speculative decoding or -tp > 1)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over this many ranks (processes; one GPU each on CUDA), Megatron style; "
                   "on one machine the engine starts them itself (default: %(default)s)")
    p.add_argument("--distributed-init-method", default=None, metavar="URL",
                   help="where the ranks meet: tcp://HOST:PORT of node 0 (needed with --nnodes > 1) or env:// "
                   "(torchrun); default: a free port on 127.0.0.1")
    p.add_argument("--nnodes", type=int, default=1,
                   help="machines the ranks span; each runs tensor-parallel-size / nnodes of them (default: %(default)s)")
    p.add_argument("--node-rank", type=int, default=0,
                   help="this machine's place among --nnodes: 0 serves, the others only compute (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log verbosity (default: %(default)s)")


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for all interfaces (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists; default: MODEL as given")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (also ${API_KEY_ENV})")
    p.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS,
                   help="requests allowed to wait for their first token; more get 429 with Retry-After "
                   "(default: %(default)s)")
    p.add_argument("--allowed-origins", default=None,
                   help="comma-separated origins allowed to call the API from a browser (CORS), or '*'; "
                   "CORS is off when not given")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="largest request body in bytes; larger ones get 413 (default: %(default)s)")
    p.add_argument("--log-prompts", action="store_true", help="include prompt text in request log lines")
    p.add_argument("--log-stats-interval", type=float, default=10.0,
                   help="seconds between stats log lines while busy; 0: never (default: %(default)s)")
    p.add_argument("--tool-call-parser", default="auto", choices=("auto", *TOOL_PARSERS),
                   help="the format the model writes tool calls in; auto: detected from the chat template "
                   "(default: %(default)s)")


def _add_chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="a system message that starts every conversation")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature, 0: greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens (default: %(default)s)")


def engine_config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> EngineConfig:
    from tokenloom.engine.llm_engine import build_engine_config

    options: dict[str, Any] = dict(
        **load_options(args), seed=args.seed, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype, block_size=args.block_size,
        speculative_config=args.speculative_config, tensor_parallel_size=args.tensor_parallel_size,
        distributed_init_method=args.distributed_init_method, nnodes=args.nnodes, node_rank=args.node_rank,
        enforce_eager=args.enforce_eager, max_cudagraph_batch_size=args.max_cudagraph_batch_size,
        async_scheduling=args.async_scheduling)
    if args.no_prefix_caching:
        if "enable_prefix_caching" not in inspect.signature(build_engine_config).parameters:
            parser.error("--no-prefix-caching: this build has no prefix cache to turn off")
        options["enable_prefix_caching"] = False
    try:
        config = build_engine_config(args.model, **options)
        config.validate()
    except ValueError as exc:
        parser.error(str(exc))
    return config


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    origins = tuple(o.strip() for o in (args.allowed_origins or "").split(",") if o.strip())
    return ServerConfig(
        host=args.host, port=args.port, served_model_name=args.served_model_name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_queued_requests=args.max_queued_requests, allowed_origins=origins,
        max_request_bytes=args.max_request_bytes, log_level=args.log_level, log_prompts=args.log_prompts,
        log_stats_interval_s=args.log_stats_interval, tool_call_parser=args.tool_call_parser)


def _run_as_worker(config: EngineConfig) -> bool:
    """A process that is not tensor-parallel rank 0 (a node other than 0, or torchrun's
    ranks 1..) computes for rank 0 until it stops; True once it has."""
    from tokenloom.engine.tensor_parallel import placement, run_rank_process

    here = placement(config)
    if here.rank == 0:
        return False
    logging.getLogger("tokenloom.server").info(
        "tensor-parallel rank %d of %d: computing for rank 0 at %s", here.rank,
        config.parallel.tensor_parallel_size, here.init_method)
    run_rank_process(config, here)
    return True


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser, engine_config: EngineConfig) -> int:
    server_config = server_config_from_args(args)
    try:
        server_config.validate()
    except ValueError as exc:
        parser.error(str(exc))
    from tokenloom.engine.core_client import EngineCoreClient
    from tokenloom.entrypoints.openai.app import build_app, run_server

    engine = EngineCoreClient.launch(engine_config)  # the engine loop runs in its own process
    model_name = server_config.served_model_name or args.model
    app = build_app(engine, server_config, model_name)
    logging.getLogger("tokenloom.server").info(
        "serving %r at http://%s:%d/v1%s", model_name, args.host, args.port,
        " (API key required)" if server_config.api_key else "")
    run_server(app, server_config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
