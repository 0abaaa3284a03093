"""LLMEngine: the synchronous core. add_request / abort_request / step.

One step::

    out   = scheduler.schedule()          # which sequences, how many tokens, which blocks
    model = runner.execute(out)           # one forward over the mixed batch + sampling
    seqs  = scheduler.update(out, model)  # append tokens, stop, free blocks
    deltas = outputs.make_outputs(seqs)   # text, stop strings, logprobs -> RequestOutput

Requests enter in two halves so that a server can validate on its own thread:
``prepare_request`` checks and tokenizes (touches no engine state) and
``admit`` hands the prepared sequences to the scheduler.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenloom.config import (
    DEFAULT_MAX_CUDAGRAPH_BATCH_SIZE,
    CacheConfig,
    EngineConfig,
    ModelArchConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    parse_speculative_config,
    resolve_device_defaults,
    resolve_scheduler_defaults,
)
from tokenloom.engine.gpu_profile import profile_forward
from tokenloom.engine.tensor_parallel import ProfileRequest, RankReport, TensorParallel, rank_device
from tokenloom.engine.memory import (
    GiB,
    check_kv_cache_fits,
    default_kv_cache_memory,
    gpu_kv_cache_bytes,
    kv_bytes_per_token,
    num_kv_blocks,
    resolve_max_model_len,
)
from tokenloom.engine.input_processor import InputProcessor, PreparedRequest
from tokenloom.engine.output_processor import OutputProcessor
from tokenloom.engine.stats import StatsCollector
from tokenloom.engine.tokenizer import Tokenizer
from tokenloom.gguf_file import GGUFFile
from tokenloom.kv_cache.manager import KVCacheManager
from tokenloom.model.layers.attention import kv_row_width
from tokenloom.model.loader import load_model
from tokenloom.model.footprint import weights_bytes
from tokenloom.model.loader.gguf import load_gguf_model
from tokenloom.model_files import resolve_model_path, shape_tokenizer
from tokenloom.parallel.group import SINGLE, TPGroup
from tokenloom.parallel.layout import tp_shard
from tokenloom.request import Request, RequestOutput, RequestStatus
from tokenloom.runner.graph_buckets import capture_sizes
from tokenloom.runner.model_runner import LaunchedStep, ModelRunner
from tokenloom.sampling_params import SamplingParams
from tokenloom.sched.output import SchedulerOutput
from tokenloom.sched.scheduler import Scheduler
from tokenloom.spec_decode.draft_model import DraftModelProposer
from tokenloom.spec_decode.drafter import Drafter
from tokenloom.structured import GrammarBitmask, SequenceGrammar, StructuredOutputManager

logger = logging.getLogger(__name__)

_NOTHING_SCHEDULED = SchedulerOutput(scheduled=(), num_batched_tokens=0)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KV_CACHE_DTYPES = {**_DTYPES, "int8": torch.int8, "fp8": torch.float8_e4m3fn}


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        config = _resolve_devices(config)
        self.tp: TensorParallel | None = None
        try:
            self._build(config)
        except BaseException:
            self.shutdown(graceful=False)
            raise

    def _build(self, config: EngineConfig) -> None:
        started = time.perf_counter()
        device = torch.device(config.model.device)
        if config.parallel.tensor_parallel_size > 1:
            device = rank_device(config, 0)
            self.tp = TensorParallel(config, device)
            weakref.finalize(self, self.tp.stop)  # no rank outlives a forgotten engine
        dtype = _DTYPES[config.model.dtype]
        torch.manual_seed(config.model.seed)
        group = self.tp.group if self.tp is not None else SINGLE
        self.tokenizer, (model, arch), path = _load_tokenizer_and_model(config.model, dtype, device, group)
        reports = [RankReport(0, str(device), weights_bytes(model))]
        if self.tp is not None:
            reports = self.tp.check_reports(reports[0])
        self.arch = arch
        kv_dtype = _kv_cache_dtype(config.cache.kv_cache_dtype, model, dtype)
        draft = _load_draft_model(config, self.tokenizer, arch, dtype, device)
        caches = _kv_caches(config, arch, kv_dtype, draft)
        self.config = _resolve_config(config, arch, sum(r.weights_bytes for r in reports) + (
                                          draft.weights_bytes if draft else 0),
                                      lambda: _auto_kv_cache_memory(config, model, arch, kv_dtype, device, self.tp),
                                      caches)
        cache = self.config.cache
        self.kv_manager = KVCacheManager(cache.num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.config.scheduler, self.kv_manager)
        sched = self.config.scheduler
        if self.tp is not None:
            self.tp.start_runners(self.config, kv_dtype)
        self.runner = ModelRunner(model, arch, cache.num_blocks, cache.block_size, kv_dtype, device,
                                  sched.max_num_seqs, sched.max_model_len,
                                  broadcast=None if self.tp is None else self.tp.group.broadcast_object,
                                  cudagraph_sizes=_cudagraph_sizes(self.config, device))
        self.inputs = InputProcessor(self.tokenizer, arch.vocab_size, self.config.scheduler.max_model_len)
        self.outputs = OutputProcessor(self.tokenizer)
        self.stats = StatsCollector()
        self.eos_token_ids = tuple(dict.fromkeys(self.tokenizer.eos_token_ids + arch.eos_token_ids))
        self.structured = StructuredOutputManager(self.tokenizer, arch.vocab_size, self.eos_token_ids)
        self.drafter = _build_drafter(self.config, draft, device)
        # Constrained user requests whose grammar is not yet known to compile (request id -> sequences).
        self._compiling: dict[str, tuple[Request, ...]] = {}
        self._in_flight: tuple[SchedulerOutput, LaunchedStep] | None = None  # async scheduling's step N
        self._settled: list[RequestOutput] = []  # outputs of a step in flight applied early (_settle_in_flight)
        self.debug = os.environ.get("TOKENLOOM_DEBUG") == "1"
        logger.info("engine ready in %.1fs: %s%s, %s (quantization %s) on %s, %s kernels, %d KV blocks x %d "
                    "tokens (%.2f GiB) in %s, max_model_len %d, prefix caching %s, async scheduling %s",
                    time.perf_counter() - started,
                    path.name, " (dummy weights)" if config.model.load_format == "dummy" else "",
                    config.model.dtype, config.model.quantization, device, model.ops.name, cache.num_blocks,
                    cache.block_size,
                    _kv_cache_bytes(arch, cache, kv_dtype, cache.num_blocks) / GiB,
                    str(kv_dtype).removeprefix("torch."), self.config.scheduler.max_model_len,
                    "on" if cache.enable_prefix_caching else "off",
                    "on" if self.config.scheduler.async_scheduling else "off")
        if self.tp is not None:
            _log_tensor_parallel(arch, reports, cache, kv_dtype)

    @classmethod
    def from_options(cls, model: str = "smollm2-135m", **options) -> LLMEngine:
        return cls(build_engine_config(model=model, **options))

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    # -- requests ----------------------------------------------------------

    def prepare_request(self, request_id: str, prompt: str | list[int],
                        params: SamplingParams) -> PreparedRequest:
        """Validate and tokenize; raises ValueError (InvalidParameter names the field)."""
        return self.inputs.prepare(request_id, prompt, params)

    def admit(self, prepared: PreparedRequest) -> None:
        if prepared.request_id in self.outputs:
            raise ValueError(f"request id {prepared.request_id!r} is already running")
        sequences = self._make_sequences(prepared.request_id, prepared.prompt_token_ids, prepared.params)
        self._settle_in_flight({s.request_id for s in sequences})
        self.outputs.add(prepared.request_id, prepared.prompt, prepared.prompt_token_ids,
                         prepared.params, [s.request_id for s in sequences])
        for seq in sequences:
            self.scheduler.add_request(seq)
        if prepared.params.structured_outputs is not None:
            # Watched until its compile is known good; one that already failed is finished at the next step.
            self._compiling[prepared.request_id] = sequences

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        self.admit(self.prepare_request(request_id, prompt, params))

    def abort_request(self, request_id: str) -> None:
        """Stop a user request now: its KV blocks are freed before this returns."""
        self.scheduler.finish_requests(self._sequence_ids(request_id), RequestStatus.FINISHED_ABORTED)
        self.outputs.remove(request_id)
        self._compiling.pop(request_id, None)
        self._record_stats(_NOTHING_SCHEDULED, 0)
        self._check_idle()

    def has_unfinished_requests(self) -> bool:
        """Requests to run, or a step in flight whose tokens are not applied yet."""
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    # -- the loop ------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One turn of the loop: the outputs of the step that finished in it.

        With async scheduling the turn plans and queues step N+1 before it waits for
        step N's tokens, so the device is never idle while the host schedules::

            plain       schedule N | run N | update N || schedule N+1 | run N+1 | ...
            overlapped  schedule N+1 | queue N+1 | wait N, update N || schedule N+2 | ...

        A sequence whose step N ends it (EOS, stop, abort) may have had step N+1
        computed too: that token is dropped, and the stop stays exact."""
        ready = self._finish_failed_grammars() + self._settled  # outputs this turn made apart from steps
        self._settled = []
        done: list[RequestOutput] = []
        if self._in_flight is not None and not self.scheduler.can_schedule_ahead():
            done = self._finish(*self._in_flight)  # a sequence must see its token before it is planned
            self._in_flight = None
        out = self.scheduler.schedule()
        self._record_prefix_cache()
        launched = None if out.is_empty else self._launch(out)
        if not self.config.scheduler.async_scheduling and launched is not None:
            return ready + self._finish(out, launched)
        if self._in_flight is not None:
            done = self._finish(*self._in_flight)
        self._in_flight = None if launched is None else (out, launched)
        if out.is_empty and self._in_flight is None and not done:
            self._record_stats(out, 0)
            self._check_idle()
            self._wait_for_grammars()
        return ready + done

    def _settle_in_flight(self, sequence_ids: set[str]) -> None:
        """A new sequence taking the id of one in the step in flight (aborted, then sent
        again): apply that step first, so that its results cannot land on the newcomer.
        Its outputs come with the next ``step()``."""
        if self._in_flight is not None and any(s.request_id in sequence_ids for s in self._in_flight[0].scheduled):
            self._settled.extend(self._finish(*self._in_flight))
            self._in_flight = None

    def _launch(self, out: SchedulerOutput) -> LaunchedStep:
        draft_probs = self.drafter.draft_probs() if self.drafter is not None else None
        return self.runner.launch(out, self._grammar_bitmask(out), draft_probs)

    def _finish(self, out: SchedulerOutput, launched: LaunchedStep) -> list[RequestOutput]:
        """Wait for a step's tokens and apply them: stops, blocks, text, stats, drafts."""
        model_out = self.runner.collect(launched)
        updated = self.scheduler.update(out, model_out)
        for req in self.outputs.stop_string_hits(updated):
            self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
            req.stop_reason = self.outputs.stop_string_of(req)
        outputs = self.outputs.make_outputs(updated)
        # The tokens the outputs carry: with speculation, those past a stop never count.
        self._record_stats(out, sum(len(c.token_ids) for o in outputs for c in o.outputs))
        self.stats.record_spec_decode(out, model_out)
        if self.drafter is not None:
            self.drafter.propose(self.scheduler.running)
        self._check_idle()
        return outputs

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def check_health(self) -> None:
        """RuntimeError when the engine can no longer step (a tensor-parallel rank died)."""
        if self.tp is not None:
            self.tp.check_health()

    def shutdown(self, graceful: bool = True) -> None:
        """End the tensor-parallel ranks (nothing to do on one rank); the engine cannot
        step afterwards."""
        if self.tp is not None:
            self.tp.stop(graceful)

    # -- structured output ---------------------------------------------------

    def _grammar_bitmask(self, out: SchedulerOutput) -> GrammarBitmask | None:
        """The allowed next tokens of every constrained sequence that samples this step."""
        rows = [(sr, req.grammar) for sr in out.scheduled
                if sr.sample and sr.sampling_params.structured_outputs is not None
                and (req := self.scheduler.get_request(sr.request_id)) is not None]
        if not rows:
            return None
        # A sequence verifying drafts has a row per draft more (its sample rows).
        request_ids = tuple(sr.request_id for sr, _ in rows for _ in range(sr.num_sample_rows))
        return GrammarBitmask(request_ids, self.structured.fill_bitmask(
            [g for _, g in rows], [sr.spec_token_ids for sr, _ in rows]))

    def _finish_failed_grammars(self) -> list[RequestOutput]:
        """Requests whose grammar failed to compile end with the error (they never ran,
        so they hold no blocks); compiled ones stop being watched."""
        failed = []
        for request_id, sequences in list(self._compiling.items()):
            grammar = sequences[0].grammar
            if not grammar.is_ready:
                continue
            del self._compiling[request_id]
            if grammar.error is None:
                continue
            self.scheduler.finish_requests([s.request_id for s in sequences], RequestStatus.FINISHED_ABORTED)
            self.outputs.remove(request_id)
            failed.append(RequestOutput(request_id, None, sequences[0].prompt_token_ids, [], finished=True,
                                        error=grammar.error))
            logger.info("request %s failed: its grammar does not compile: %s", request_id, grammar.error)
        return failed

    def _wait_for_grammars(self, timeout_s: float = 0.01) -> None:
        """Nothing could run: rather than spin, wait briefly for a compile to finish."""
        if self._compiling:
            futures = [seqs[0].grammar.compiled for seqs in self._compiling.values()]
            concurrent.futures.wait(futures, timeout=timeout_s, return_when=concurrent.futures.FIRST_COMPLETED)

    # -- helpers -------------------------------------------------------------

    def _make_sequences(self, request_id: str, token_ids: list[int],
                        params: SamplingParams) -> tuple[Request, ...]:
        if params.n == 1:
            return (Request(request_id, token_ids, params, self.eos_token_ids, grammar=self._grammar(params)),)
        # Only sample 0 computes prompt logprobs: the others share its prompt blocks.
        sibling_params = dataclasses.replace(params, prompt_logprobs=None)
        return tuple(
            Request(f"{request_id}#{i}", token_ids, params if i == 0 else sibling_params,
                    self.eos_token_ids, sample_index=i, parent_id=request_id, grammar=self._grammar(params))
            for i in range(params.n))

    def _grammar(self, params: SamplingParams) -> SequenceGrammar | None:
        """A sequence's own matcher (samples of one request share the compile, not the state)."""
        spec = params.structured_outputs
        return None if spec is None else self.structured.sequence_grammar(spec)

    def _sequence_ids(self, request_id: str) -> list[str]:
        return self.outputs.sequence_ids(request_id)

    def _record_stats(self, out: SchedulerOutput, num_generated: int) -> None:
        self.stats.record_step(out, num_generated, self.scheduler.num_running,
                               self.scheduler.num_waiting, self.kv_manager.usage)

    def _record_prefix_cache(self) -> None:
        """One query per user request, at its first admission: its prompt length and the
        prompt tokens it reused (sample 0 stands for the request; samples 1.. share its
        prompt blocks whether or not the cache is on)."""
        if not self.config.cache.enable_prefix_caching:
            return
        for req in self.scheduler.first_admissions:
            if req.sample_index == 0:
                self.stats.record_prefix_cache(req.num_prompt_tokens, req.num_cached_tokens)

    def _check_idle(self) -> None:
        """In debug mode (TOKENLOOM_DEBUG=1), check every invariant whenever the engine goes idle."""
        if self.debug and not self.has_unfinished_requests():
            self.check_integrity()


@dataclass(frozen=True, slots=True)
class _DraftModel:
    """A draft model for speculative decoding, loaded before the KV cache is sized: its
    cache takes a share of the KV budget (as many tokens as the target's)."""

    model: torch.nn.Module
    arch: ModelArchConfig
    kv_dtype: torch.dtype
    name: str
    weights_bytes: int


def _load_draft_model(config: EngineConfig, tokenizer: Tokenizer, arch: ModelArchConfig, dtype: torch.dtype,
                      device: torch.device) -> _DraftModel | None:
    """The draft model of ``--speculative-config`` (None without one), in the target's dtype
    and quantization. Its vocabulary must be the target's."""
    spec = config.speculative
    if spec is None or spec.method != "draft_model":
        return None
    draft_config = dataclasses.replace(config.model, model=spec.model, load_format="auto")
    draft_tokenizer, (model, draft_arch), path = _load_tokenizer_and_model(draft_config, dtype, device)
    if draft_arch.vocab_size != arch.vocab_size or draft_tokenizer.backend.get_vocab() != tokenizer.backend.get_vocab():
        raise ValueError(f"speculative config: draft model {path.name} has another vocabulary than the target "
                         f"({draft_arch.vocab_size} vs {arch.vocab_size} ids, or different tokens); "
                         "a draft model must share the target's tokenizer")
    kv_dtype = _kv_cache_dtype(config.cache.kv_cache_dtype, model, dtype)
    return _DraftModel(model, draft_arch, kv_dtype, path.name, weights_bytes(model))


def _build_drafter(config: EngineConfig, draft: _DraftModel | None, device: torch.device) -> Drafter | None:
    spec = config.speculative
    if spec is None:
        return None
    proposer = None
    if draft is not None:
        cache, sched = config.cache, config.scheduler
        logger.info("draft model %s: %d layers, hidden %d, %d KV blocks (%.2f GiB)", draft.name,
                    draft.arch.num_hidden_layers, draft.arch.hidden_size, cache.num_blocks,
                    _kv_cache_bytes(draft.arch, cache, draft.kv_dtype, cache.num_blocks) / GiB)
        proposer = DraftModelProposer(draft.model, draft.arch, cache.num_blocks, cache.block_size, draft.kv_dtype,
                                      device, sched.max_num_seqs, sched.max_model_len, sched.max_num_batched_tokens)
    logger.info("speculative decoding: %s, %d draft tokens per step%s, off above %s running sequences",
                spec.method, spec.num_speculative_tokens,
                f" (n-gram {spec.prompt_lookup_min}..{spec.prompt_lookup_max})" if spec.method == "ngram"
                else f" from {spec.model}", spec.disable_by_batch_size)
    return Drafter(spec, config.scheduler.max_model_len, proposer)


def _kv_cache_dtype(choice: str, model: torch.nn.Module, dtype: torch.dtype) -> torch.dtype:
    if choice != "auto":
        return _KV_CACHE_DTYPES[choice]
    quantized = getattr(model, "logits_quantized", None) is not None
    return torch.int8 if quantized else dtype


def _resolve_devices(config: EngineConfig) -> EngineConfig:
    """"auto" device, dtype and quantization, and the device's default token budget, made
    concrete once (``resolve_device_defaults``, ``resolve_scheduler_defaults``)."""
    model = resolve_device_defaults(config.model, torch.cuda.is_available())
    if config.model.device == "auto":
        logger.info("device auto: %s (torch.cuda.is_available() is %s)", model.device, model.device == "cuda")
    scheduler = resolve_scheduler_defaults(config.scheduler, model.device, config.speculative is not None,
                                           config.parallel.tensor_parallel_size > 1)
    return dataclasses.replace(config, model=model, scheduler=scheduler)


def _load_tokenizer_and_model(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                              group: TPGroup = SINGLE):
    """(tokenizer, (model, arch), the path they came from); the model is rank 0's part of it
    under tensor parallelism. A GGUF file is opened and its header parsed once for both."""
    path = resolve_model_path(config.model, config.load_format)
    file = _gguf_file(config, path)
    tokenizer = _tokenizer_of(config, path, file)
    if file is not None:
        return tokenizer, load_gguf_model(file, dtype, device, config.quantization, group), path
    return tokenizer, load_model(path, dtype, device, config.quantization, config.load_format, config.seed,
                                 group), path


def load_tokenizer(config: ModelConfig) -> Tokenizer:
    """The tokenizer of ``config``'s model without the model (a server's front end, whose
    engine core loads the model in its own process)."""
    path = resolve_model_path(config.model, config.load_format)
    return _tokenizer_of(config, path, _gguf_file(config, path))


def _gguf_file(config: ModelConfig, path: Path) -> GGUFFile | None:
    return GGUFFile(path) if config.load_format != "dummy" and path.suffix == ".gguf" and path.is_file() else None


def _tokenizer_of(config: ModelConfig, path: Path, file: GGUFFile | None) -> Tokenizer:
    """Dummy weights take the shape's own tokenizer or, for a bare shape, the default
    model's shipped with the shapes."""
    if config.load_format == "dummy":
        return Tokenizer.from_path(shape_tokenizer(path))
    return Tokenizer.from_gguf_file(file) if file is not None else Tokenizer.from_path(path)


def build_engine_config(model: str = "smollm2-135m", *, dtype: str = "auto", device: str = "auto",
                        quantization: str = "auto", load_format: str = "auto", kv_cache_dtype: str = "auto",
                        max_model_len: int | None = None, seed: int = 0, block_size: int = 16,
                        kv_cache_memory: float | None = None, num_kv_blocks: int | None = None,
                        gpu_memory_utilization: float = 0.9,
                        max_num_batched_tokens: int | None = None, max_num_seqs: int = 256,
                        enable_prefix_caching: bool = True, async_scheduling: bool | None = None,
                        speculative_config: str | dict | SpeculativeConfig | None = None,
                        tensor_parallel_size: int = 1, distributed_init_method: str | None = None,
                        nnodes: int = 1, node_rank: int = 0, enforce_eager: bool = False,
                        max_cudagraph_batch_size: int = DEFAULT_MAX_CUDAGRAPH_BATCH_SIZE) -> EngineConfig:
    """The engine's options as keyword arguments (LLM(...) and the CLI use this).
    ``speculative_config``: vLLM's JSON object (or its text), see ``SpeculativeConfig``;
    the tensor-parallel options: see ``ParallelConfig``; ``enforce_eager`` and
    ``max_cudagraph_batch_size`` (CUDA graphs of decode steps): see ``ModelConfig``."""
    return EngineConfig(
        model=ModelConfig(model=model, dtype=dtype, device=device, quantization=quantization,
                          load_format=load_format, max_model_len=max_model_len, seed=seed,
                          enforce_eager=enforce_eager, max_cudagraph_batch_size=max_cudagraph_batch_size),
        cache=CacheConfig(block_size=block_size, kv_cache_dtype=kv_cache_dtype, kv_cache_memory=kv_cache_memory,
                          num_blocks=num_kv_blocks, gpu_memory_utilization=gpu_memory_utilization,
                          enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                  async_scheduling=async_scheduling),
        speculative=parse_speculative_config(speculative_config),
        parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size,
                                distributed_init_method=distributed_init_method, nnodes=nnodes, node_rank=node_rank),
    )


def _resolve_config(config: EngineConfig, arch: ModelArchConfig, weights_bytes: int,
                    auto_kv_cache_memory: Callable[[], float],
                    caches: list[tuple[ModelArchConfig, torch.dtype]]) -> EngineConfig:
    """Fill in what depends on the model: the number of KV blocks and max_model_len.
    A cache size the user asked for (blocks or GiB) wins over ``auto_kv_cache_memory()``
    and must fit in the memory the weights left; so must a GPU's derived one (another
    process may hold part of the GPU). Each of ``caches`` (shape and cache dtype:
    ``_kv_caches``) holds as many tokens as the others, from the same budget."""
    cache = config.cache
    num_blocks = cache.num_blocks
    device_type = torch.device(config.model.device).type
    if num_blocks is None:
        budget = cache.kv_cache_memory or auto_kv_cache_memory()
        bytes_per_token = sum(kv_bytes_per_token(a, _kv_row_bytes(a, d)) for a, d in caches)
        num_blocks = num_kv_blocks(bytes_per_token, cache.block_size, budget)
    if cache.num_blocks is not None or cache.kv_cache_memory is not None or device_type == "cuda":
        check_kv_cache_fits(sum(_kv_cache_bytes(a, cache, d, num_blocks) for a, d in caches), weights_bytes,
                            device_type)
    max_len = resolve_max_model_len(config.model.max_model_len, arch.max_position_embeddings,
                                    num_blocks * cache.block_size)
    return dataclasses.replace(
        config,
        cache=dataclasses.replace(cache, num_blocks=num_blocks),
        scheduler=dataclasses.replace(config.scheduler, max_model_len=max_len),
    )


def _kv_row_bytes(arch: ModelArchConfig, dtype: torch.dtype) -> int:
    return kv_row_width(arch.head_dim, dtype) * dtype.itemsize


def _kv_cache_bytes(arch: ModelArchConfig, cache: CacheConfig, dtype: torch.dtype, num_blocks: int) -> int:
    return num_blocks * cache.block_size * kv_bytes_per_token(arch, _kv_row_bytes(arch, dtype))


def _kv_caches(config: EngineConfig, arch: ModelArchConfig, kv_dtype: torch.dtype,
               draft: _DraftModel | None) -> list[tuple[ModelArchConfig, torch.dtype]]:
    """The KV caches a token takes room in, as (shape, cache dtype): on the CPU every
    tensor-parallel rank's (its own kv heads; the ranks share the machine's memory), on
    CUDA the largest rank's (each GPU holds one); and the draft model's."""
    size = config.parallel.tensor_parallel_size
    per_rank = [_rank_arch(arch, size, r) for r in range(size)]
    if torch.device(config.model.device).type == "cuda":
        per_rank = [max(per_rank, key=lambda a: a.num_key_value_heads)]
    return [(a, kv_dtype) for a in per_rank] + ([(draft.arch, draft.kv_dtype)] if draft is not None else [])


def _auto_kv_cache_memory(config: EngineConfig, model: torch.nn.Module, arch: ModelArchConfig,
                          kv_dtype: torch.dtype, device: torch.device, tp: TensorParallel | None) -> float:
    """The KV budget in GiB when the user gave none: a share of free RAM on the CPU; on
    CUDA, ``gpu_memory_utilization`` of the GPU less a profiled forward's peak (the
    smallest over the tensor-parallel ranks' GPUs)."""
    if device.type != "cuda":
        return default_kv_cache_memory()
    own = functools.partial(profile_forward, config, model, arch, kv_dtype, device)
    profiles = [own()] if tp is None else tp.profile(ProfileRequest(config, kv_dtype), own)
    torch.cuda.empty_cache()  # the profile's activations and cache go back before the real cache is made
    utilization = config.cache.gpu_memory_utilization
    profile = min(profiles, key=lambda p: gpu_kv_cache_bytes(p, utilization))
    kv_bytes = gpu_kv_cache_bytes(profile, utilization)
    logger.info("GPU memory: %.2f GiB weights, %.2f GiB activation peak (%d tokens), %.2f GiB outside torch; "
                "KV cache %.2f GiB (%.2f x %.1f GiB in all)", profile.weights_bytes / GiB,
                profile.activation_bytes / GiB, config.scheduler.max_num_batched_tokens,
                profile.non_torch_bytes / GiB, kv_bytes / GiB, config.cache.gpu_memory_utilization,
                profile.total_bytes / GiB)
    return kv_bytes / GiB


def _log_tensor_parallel(arch: ModelArchConfig, reports: list[RankReport], cache: CacheConfig,
                         kv_dtype: torch.dtype) -> None:
    """The layout: each rank's device, heads, intermediate and vocabulary rows, weights and KV cache."""
    size = len(reports)
    for report in reports:
        shard = tp_shard(arch, size, report.rank)
        logger.info("tensor parallel rank %d/%d on %s: q heads %d-%d, kv heads %d-%d, intermediate rows %d-%d, "
                    "vocabulary %d-%d; weights %.2f GiB, KV cache %.2f GiB", report.rank, size, report.device,
                    shard.q_heads[0], shard.q_heads[1] - 1, shard.kv_heads[0], shard.kv_heads[1] - 1,
                    shard.intermediate[0], shard.intermediate[1] - 1, shard.vocab[0], shard.vocab[1] - 1,
                    report.weights_bytes / GiB,
                    _kv_cache_bytes(_rank_arch(arch, size, report.rank), cache, kv_dtype, cache.num_blocks) / GiB)


def _cudagraph_sizes(config: EngineConfig, device: torch.device) -> tuple[int, ...]:
    """The decode batch sizes to capture as CUDA graphs: none on the CPU (padding would
    cost it real work), with ``enforce_eager``, or under tensor parallelism, where every
    rank would have to replay the same graph in lockstep with rank 0's (its collectives
    inside the graphs); rank 0 alone replaying would leave the others' all-reduces unmatched."""
    if device.type != "cuda" or config.model.enforce_eager:
        return ()
    if config.parallel.tensor_parallel_size > 1:
        logger.info("CUDA graphs off under tensor parallelism: decode steps run eagerly on every rank")
        return ()
    return capture_sizes(config.scheduler.max_num_seqs, config.model.max_cudagraph_batch_size)


def _rank_arch(arch: ModelArchConfig, size: int, rank: int) -> ModelArchConfig:
    """``arch`` as one tensor-parallel rank's KV cache sees it: its own kv heads."""
    return dataclasses.replace(arch, num_key_value_heads=tp_shard(arch, size, rank).num_kv_heads)
