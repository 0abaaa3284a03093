"""``tokenloom bench serve | throughput | perplexity | report | compare-texts`` (also
``python -m tokenloom.bench ...``).

``add_bench_subcommands(subparsers)`` adds ``bench`` to another CLI; the parsed
namespace then runs with ``run_bench(args)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
API_KEY_ENV = "TOKENLOOM_API_KEY"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenloom bench", description=_DESCRIPTION)
    _add_commands(parser.add_subparsers(dest="bench_command", metavar="COMMAND"))
    args = parser.parse_args(argv)
    if args.bench_command is None:
        parser.print_help()
        return 2
    return run_bench(args)


def add_bench_subcommands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``bench`` (with serve, throughput, report ... under it) to a CLI's subcommands."""
    bench = subparsers.add_parser("bench", help="benchmark a server or the offline engine", description=_DESCRIPTION)
    _add_commands(bench.add_subparsers(dest="bench_command", metavar="COMMAND", required=True))
    return bench


def run_bench(args: argparse.Namespace) -> int:
    return args.bench_func(args)


_DESCRIPTION = ("Serving benchmarks against any OpenAI-compatible server, offline engine throughput, "
                "and reports that put several engines side by side.")


def _add_commands(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="load-test an OpenAI-compatible server with streaming requests",
                                description="Streams requests at a server over a sweep of load levels; "
                                "writes every level to a JSON file.")
    _add_serve_args(serve)
    serve.set_defaults(bench_func=_cmd_serve)
    throughput = commands.add_parser("throughput", help="offline tok/s through LLM.generate (no HTTP)")
    _add_throughput_args(throughput)
    throughput.set_defaults(bench_func=_cmd_throughput)
    perplexity = commands.add_parser("perplexity", help="perplexity on a text file (llama-perplexity's method)")
    _add_perplexity_args(perplexity)
    perplexity.set_defaults(bench_func=_cmd_perplexity)
    report = commands.add_parser("report", help="tables and an HTML report from one or more result files")
    report.add_argument("results", nargs="+", type=Path, help="JSON files written by 'bench serve'")
    report.add_argument("--html", type=Path, default=None, help="write a self-contained HTML report here")
    report.add_argument("--markdown", type=Path, default=None, help="write the markdown tables here")
    report.add_argument("--baseline", default="tokenloom", help="label the others are compared with (default: %(default)s)")
    report.add_argument("--title", default="tokenloom bench", help="title of the HTML report")
    report.set_defaults(bench_func=_cmd_report)
    compare = commands.add_parser("compare-texts", help="are two runs' answers identical? (exit 1 if not)",
                                  description="Compares request by request the texts two 'bench serve "
                                  "--save-texts' runs of the same workload saved; exit 0 when all are identical, "
                                  "1 when some differ, 2 when the files cannot be compared.")
    compare.add_argument("first", type=Path, help="a result file of 'bench serve --save-texts'")
    compare.add_argument("second", type=Path, help="another, of the same workload and levels")
    compare.set_defaults(bench_func=_cmd_compare_texts)


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    from tokenloom.bench.serve import FORCE_OUTPUT_MODES, RESPONSE_FORMATS
    from tokenloom.bench.workloads import ENDPOINTS, WORKLOADS

    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL (default: %(default)s)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name sent in requests (default: %(default)s)")
    p.add_argument("--tokenizer", default=None, help="model file, HF directory, alias or shipped shape (the "
                   "default model's tokenizer) whose tokenizer builds the prompts (default: --model)")
    p.add_argument("--api-key", default=None, help=f"Bearer key (default: ${API_KEY_ENV} if set)")
    p.add_argument("--endpoint", default="completions", choices=ENDPOINTS, help="(default: %(default)s)")
    p.add_argument("--workload", default="random", choices=WORKLOADS, help="(default: %(default)s)")
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens; copy and open prompts are as "
                   "long as their text (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens (default: %(default)s)")
    p.add_argument("--shared-prefix-len", type=int, default=0, help="system prompt tokens of the shared-prefix workload")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals (default: %(default)s)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per level (default: %(default)s)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", default=None, help="comma-separated concurrency levels (default: 1,8,32,64)")
    load.add_argument("--request-rate", default=None, help="comma-separated Poisson request rates, requests/s")
    p.add_argument("--max-seconds", type=float, default=None, help="start no request after this long in a level")
    p.add_argument("--num-warmup", type=int, default=1, help="unrecorded requests sent first (default: %(default)s)")
    p.add_argument("--force-output", default="ignore_eos", choices=FORCE_OUTPUT_MODES,
                   help="request field(s) that force --output-len tokens (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="(default: %(default)s)")
    p.add_argument("--response-format", default="none", choices=tuple(RESPONSE_FORMATS),
                   help="constrain every answer: json-object, or json-schema (a schema of 64+ records, so "
                   "answers run to --output-len) (default: %(default)s)")
    p.add_argument("--no-stream-usage", action="store_true",
                   help="do not send stream_options.include_usage (count output tokens by re-encoding)")
    p.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    p.add_argument("--label", default=None, help="name of this run in reports (default: the model name)")
    p.add_argument("--output-json", type=Path, default=None, help="result file (default: bench-LABEL.json)")
    p.add_argument("--save-texts", action="store_true",
                   help="keep every request's output text in the result file (see 'bench compare-texts')")
    p.add_argument("--html", type=Path, default=None, help="also write an HTML report of this run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_throughput_args(p: argparse.ArgumentParser) -> None:
    from tokenloom.entrypoints.load_args import add_load_args

    p.add_argument("--model", default=DEFAULT_MODEL, help="a .gguf file, HF directory or alias; with --load-format "
                   "dummy also a config.json or a shipped shape, e.g. llama-3.1-8b (default: %(default)s)")
    add_load_args(p)
    p.add_argument("--num-prompts", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--input-len", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--output-len", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts (default: %(default)s)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="(default: the engine's, 512 on the CPU, 2048 on CUDA)")
    p.add_argument("--kv-cache-memory", type=float, default=None, help="GiB (default: the engine's)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help="speculative decoding, as `tokenloom serve --speculative-config` (default: off)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks the model is split over, as `tokenloom serve -tp` (default: %(default)s)")
    p.add_argument("--concurrency", default=None,
                   help="comma-separated levels: instead of the two passes, run bench serve's closed-loop "
                   "levels offline (same prompts, same timings, a bench serve result file for 'bench report'), "
                   "e.g. --input-len 2048 --output-len 2048 --concurrency 1,100")
    p.add_argument("--label", default="tokenloom-offline",
                   help="name of a --concurrency run in reports (default: %(default)s)")
    p.add_argument("--output-json", type=Path, default=None, help="also write the figures here")


def _cmd_serve(args: argparse.Namespace) -> int:
    from tokenloom.bench.report import html_report, markdown, summary_table
    from tokenloom.bench.serve import ServeTarget
    from tokenloom.bench.sweep import BenchError, run_sweep
    from tokenloom.bench.workloads import WorkloadSpec
    from tokenloom.engine.tokenizer import Tokenizer
    from tokenloom.model_files import resolve_tokenizer

    try:
        levels = _parse_levels(args.concurrency, args.request_rate)
        extra_body = json.loads(args.extra_body) if args.extra_body else {}
        if not isinstance(extra_body, dict):
            raise ValueError("--extra-body must be a JSON object")
        workload = WorkloadSpec(args.workload, args.num_prompts, args.input_len, args.output_len, args.seed,
                                args.shared_prefix_len, args.endpoint)
        workload.validate()
    except ValueError as exc:
        print(f"tokenloom bench: {exc}", file=sys.stderr)
        return 2
    target = ServeTarget(base_url=args.base_url, model=args.model, endpoint=args.endpoint,
                         api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                         force_output=args.force_output, temperature=args.temperature,
                         stream_usage=not args.no_stream_usage, response_format=args.response_format,
                         extra_body=extra_body)
    tokenizer = Tokenizer.from_path(resolve_tokenizer(args.tokenizer or args.model))
    label = args.label or args.model
    try:
        result = run_sweep(target, tokenizer, workload, levels, label, args.max_seconds, args.num_warmup,
                           show_progress=not args.quiet, save_texts=args.save_texts)
    except BenchError as exc:
        print(f"tokenloom bench: {exc}", file=sys.stderr)
        return 1
    output = args.output_json or Path(f"bench-{_slug(label)}.json")
    result.save(output)
    print(markdown(summary_table([result])))
    print(f"results: {output}")
    if args.html:
        args.html.write_text(html_report([result], title=f"tokenloom bench: {label}"))
        print(f"report: {args.html}")
    return 0


def _add_perplexity_args(p: argparse.ArgumentParser) -> None:
    from tokenloom.config import DTYPE_CHOICES, KV_CACHE_DTYPES, QUANTIZATION_MODES

    p.add_argument("text", type=Path, help="a UTF-8 text file")
    p.add_argument("--model", default=DEFAULT_MODEL, help="a .gguf file, HF directory or alias (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="(default: %(default)s)")
    p.add_argument("--quantization", default="auto", choices=QUANTIZATION_MODES, help="(default: %(default)s)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help="(default: %(default)s)")
    p.add_argument("--n-ctx", type=int, default=512, help="window length; its second half is scored "
                   "(default: %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=int, default=32,
                   help="prompt chunk per step; <= 32 runs the decode-sized kernels (default: %(default)s)")


def _cmd_perplexity(args: argparse.Namespace) -> int:
    from tokenloom.bench.perplexity import run_perplexity
    from tokenloom.entrypoints.llm import LLM

    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
              kv_cache_memory=0.25,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False)
    result = run_perplexity(llm, args.text.read_text(encoding="utf-8"), args.n_ctx)
    print(f"perplexity {result.perplexity:.4f} over {result.num_scored_tokens} tokens "
          f"({result.num_windows} windows of {result.n_ctx}; {args.quantization}, {llm.engine.config.model.dtype}, "
          f"KV cache {args.kv_cache_dtype}) "
          f"in {result.seconds:.1f}s")
    return 0


def _cmd_throughput(args: argparse.Namespace) -> int:
    from tokenloom.bench.throughput import format_throughput, run_throughput
    from tokenloom.entrypoints.llm import LLM

    from tokenloom.entrypoints.load_args import load_options

    try:
        llm = LLM(args.model, **load_options(args), max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory,
                  speculative_config=args.speculative_config, tensor_parallel_size=args.tensor_parallel_size)
    except ValueError as exc:
        print(f"tokenloom bench: {exc}", file=sys.stderr)
        return 2
    if args.concurrency is not None:
        return _offline_levels(llm, args)
    result = run_throughput(llm, args.num_prompts, args.input_len, args.output_len, args.seed)
    print(format_throughput(result))
    if args.output_json:
        resolved = llm.engine.config.model  # auto device and dtype as they were resolved
        figures = {k: (None if v != v else v) for k, v in dataclasses.asdict(result).items()}  # NaN -> null
        args.output_json.write_text(json.dumps({
            "model": args.model, "load_format": resolved.load_format, "device": resolved.device,
            "dtype": resolved.dtype, "quantization": resolved.quantization,
            "tensor_parallel_size": args.tensor_parallel_size, **figures}, indent=1) + "\n")
    llm.engine.shutdown()
    return 0


def _offline_levels(llm, args: argparse.Namespace) -> int:
    from tokenloom.bench.offline_sweep import run_offline_sweep
    from tokenloom.bench.report import markdown, summary_table
    from tokenloom.bench.workloads import WorkloadSpec

    try:
        levels = [level.concurrency for level in _parse_levels(args.concurrency, None)]
        workload = WorkloadSpec("random", args.num_prompts, args.input_len, args.output_len, args.seed)
        workload.validate()
    except ValueError as exc:
        print(f"tokenloom bench: {exc}", file=sys.stderr)
        return 2
    result = run_offline_sweep(llm.engine, workload, levels, args.label)
    output = args.output_json or Path(f"bench-{_slug(args.label)}.json")
    result.save(output)
    print(markdown(summary_table([result])))
    print(f"results: {output}")
    llm.engine.shutdown()
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from tokenloom.bench.report import comparison_table, html_report, markdown, summary_table
    from tokenloom.bench.results import ServeResult

    results = [ServeResult.load(path) for path in args.results]
    text = "## Summary\n\n" + markdown(summary_table(results))
    if len(results) > 1 and any(r.label == args.baseline for r in results):
        text += (f"\n## {args.baseline} / peer\n\nRatios above 1 for throughput, below 1 for latency, "
                 f"mean {args.baseline} is ahead.\n\n" + markdown(comparison_table(results, args.baseline)))
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.html:
        args.html.write_text(html_report(results, title=args.title, baseline=args.baseline))
        print(f"report: {args.html}")
    return 0


def _cmd_compare_texts(args: argparse.Namespace) -> int:
    from tokenloom.bench.results import ServeResult
    from tokenloom.bench.texts import compare_texts, format_comparison

    try:
        first, second = ServeResult.load(args.first), ServeResult.load(args.second)
        comparison = compare_texts(first, second)
    except (OSError, ValueError) as exc:
        print(f"tokenloom bench: {exc}", file=sys.stderr)
        return 2
    print(format_comparison(comparison, first.label, second.label))
    return 0 if comparison.identical else 1


def _parse_levels(concurrency: str | None, request_rate: str | None):
    from tokenloom.bench.serve import LoadLevel

    if request_rate is not None:
        return [LoadLevel(request_rate=float(v)) for v in request_rate.split(",") if v.strip()]
    return [LoadLevel(concurrency=int(v)) for v in (concurrency or "1,8,32,64").split(",") if v.strip()]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
