"""Frozen configuration objects.

Config is built once (CLI or Python), validated, and never mutated. A value
derived later (e.g. the number of KV blocks once the model is known) comes
from a function that returns a NEW config via ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# auto: bfloat16 on CUDA, float32 elsewhere (see ``resolve_device_defaults``).
DTYPE_CHOICES = ("auto", *SUPPORTED_DTYPES)
# Where the weights come from (vLLM's --load-format): auto reads the checkpoint; dummy
# fills a model of the checkpoint's (or a shipped shape's) config with random values.
LOAD_FORMATS = ("auto", "dummy")
# Weight formats of the linear layers; see tokenloom/model/loader/quantize.py.
QUANTIZATION_MODES = ("auto", "none", "int8", "int4")
# auto: int8 where the model runs quantized weights on the native kernels (about a
# quarter of float32's bytes per decode step's attention reads and per cached
# token; rows quantized one by one, see model/layers/attention.py), else the
# model dtype. fp8: float8 e4m3, cast with no scale (the Triton kernels on CUDA).
KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16", "int8", "fp8")
# The largest decode batch captured as a CUDA graph (vLLM's default); larger decode
# steps run eagerly. See runner/graph_buckets.py.
DEFAULT_MAX_CUDAGRAPH_BATCH_SIZE = 512


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Rotary embedding scaling. ``kind`` is "none", "linear" or "llama3"."""

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class ModelArchConfig:
    """Shape of a Llama-family network, read from config.json or GGUF metadata."""

    architecture: str  # e.g. "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What the user asked for: which model, on which device, in which dtype,
    with which weight format (``quantization``), from real or random weights
    (``load_format``). "auto" device and dtype are resolved once, when the engine
    is built (``resolve_device_defaults``); ``seed`` also seeds dummy weights.
    On CUDA, decode steps of up to ``max_cudagraph_batch_size`` sequences replay
    CUDA graphs (runner/cuda_graph.py) unless ``enforce_eager``; the CPU never
    captures."""

    model: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "auto"
    quantization: str = "auto"
    load_format: str = "auto"
    max_model_len: int | None = None  # None: the model's own context length
    seed: int = 0
    enforce_eager: bool = False
    max_cudagraph_batch_size: int = DEFAULT_MAX_CUDAGRAPH_BATCH_SIZE

    def validate(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {QUANTIZATION_MODES}, got {self.quantization!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if not self.device:
            raise ValueError("device must be auto or a torch device such as cpu or cuda")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_cudagraph_batch_size < 1:
            raise ValueError(f"max_cudagraph_batch_size must be > 0, got {self.max_cudagraph_batch_size}")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache sizing. The cache is sized by memory, never by
    max_model_len x max_num_seqs. ``kv_cache_memory`` is in GiB; None derives a
    default: on the CPU from free RAM (``engine.memory.default_kv_cache_memory``); on
    CUDA, ``gpu_memory_utilization`` of the GPU's memory less what the weights and a
    profiled forward take (``engine.memory.gpu_kv_cache_bytes``), as in vLLM.
    ``enable_prefix_caching``: reuse the KV of full blocks shared with earlier
    prompts (automatic, no request-side flag)."""

    block_size: int = 16
    kv_cache_dtype: str = "auto"
    kv_cache_memory: float | None = None
    num_blocks: int | None = None  # derived once the model shape is known
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


# The token budget of one step where the user gives none, per device type: vLLM's
# 2048 on a GPU. On the CPU a step of prompt tokens is compute-bound and slow (a 1B
# model prefills ~250 tokens/s on 2 cores), and every sequence in the step gets its
# next token only when the whole step ends: 2048 prompt tokens kept every first
# token of 8 concurrent 256-token prompts waiting 8 s, and every running stream
# stalled as long. 512 (llama.cpp's micro-batch) lets prompts finish in turn and
# streams go on between chunks, at no cost in throughput (docs/performance.md,
# "A step's token budget on the CPU").
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cuda": 2048, "cpu": 512}


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """One token budget per step; FCFS admission. ``max_num_batched_tokens`` None: the
    device's default (``DEFAULT_MAX_NUM_BATCHED_TOKENS``, made concrete by
    ``resolve_scheduler_defaults``).

    ``async_scheduling`` (vLLM's flag): schedule step N+1 while the device runs step N
    (engine/llm_engine.py). None: on for CUDA, off on the CPU, where the host computes
    the step itself and there is nothing to overlap; never with speculative decoding
    or tensor parallelism."""

    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 256
    max_model_len: int = 2048  # resolved from ModelConfig + model + cache
    async_scheduling: bool | None = None

    def validate(self) -> None:
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    """Tensor parallelism (vLLM's flags): one model split over ``tensor_parallel_size``
    ranks, one per process (``parallel/layout.py``; ``engine/tensor_parallel.py``).

    On one machine the engine starts the other ranks itself. Across ``nnodes``
    machines each runs ``tensor_parallel_size / nnodes`` ranks and all meet at
    ``distributed_init_method`` (``tcp://HOST:PORT`` of node 0); node 0 serves,
    the others (``node_rank`` 1..) only compute. Under torchrun (``WORLD_SIZE`` and
    ``RANK`` in the environment) torchrun starts the ranks and ``env://`` joins them.
    """

    tensor_parallel_size: int = 1
    distributed_init_method: str | None = None  # None: a free port on 127.0.0.1, or env:// under torchrun
    nnodes: int = 1
    node_rank: int = 0

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes

    def validate(self) -> None:
        size, nodes = self.tensor_parallel_size, self.nnodes
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {size!r}")
        if nodes < 1 or size % nodes:
            raise ValueError(f"nnodes ({nodes}) must be >= 1 and divide tensor_parallel_size ({size})")
        if not 0 <= self.node_rank < nodes:
            raise ValueError(f"node_rank must be in [0, {nodes - 1}], got {self.node_rank}")
        if nodes > 1 and self.distributed_init_method is None:
            raise ValueError("more than one node needs distributed_init_method (tcp://HOST:PORT of node 0)")
        method = self.distributed_init_method
        if method is not None and not method.startswith(("tcp://", "env://")):
            raise ValueError(f"distributed_init_method must be tcp://HOST:PORT or env://, got {method!r}")


SPECULATIVE_METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16
# Speculation stops paying once a step's rows are compute-bound: verifying 1 + k rows
# per request then costs about 1 + k decode rows. Measured on the default model on a
# 2-core CPU: copy-heavy requests gain 1.5x at 4 sequences and break even at 8,
# open-ended ones lose 10% at 4 (docs/performance.md, "Speculative decoding").
DEFAULT_SPEC_DISABLE_BY_BATCH_SIZE = 4


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Speculative decoding, in vLLM's ``--speculative-config`` shape.

    ``ngram`` (prompt lookup): the longest suffix of a sequence's tokens, between
    ``prompt_lookup_max`` and ``prompt_lookup_min`` tokens, found earlier in the
    sequence proposes the ``num_speculative_tokens`` tokens that followed it.
    ``draft_model``: a smaller model of the same vocabulary (``model``: file, directory
    or alias) proposes them, run by the same engine with its own paged KV cache.
    A step with more than ``disable_by_batch_size`` running sequences speculates for
    none of them (None: always speculate).
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    model: str | None = None
    disable_by_batch_size: int | None = DEFAULT_SPEC_DISABLE_BY_BATCH_SIZE

    @classmethod
    def from_dict(cls, spec: dict) -> SpeculativeConfig:
        """From the user's JSON object; ValueError naming an unknown key or a bad value.
        vLLM's spelling is accepted: a ``model`` without ``method`` is a draft model."""
        if not isinstance(spec, dict):
            raise ValueError(f"speculative config must be a JSON object, got {type(spec).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"speculative config: unknown key(s) {unknown}; known: {sorted(known)}")
        spec = dict(spec)
        if "method" not in spec and spec.get("model") is not None:
            spec["method"] = "draft_model"
        for key in ("method", "num_speculative_tokens"):
            if key not in spec:
                raise ValueError(f"speculative config: {key!r} is required")
        config = cls(**spec)
        config.validate()
        return config

    def validate(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative config: method must be one of {SPECULATIVE_METHODS}, "
                             f"got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative config: num_speculative_tokens must be an integer in "
                             f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        if self.method == "ngram":
            low, high = self.prompt_lookup_min, self.prompt_lookup_max
            if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
                raise ValueError(f"speculative config: need 1 <= prompt_lookup_min <= prompt_lookup_max, "
                                 f"got {low!r} and {high!r}")
            if self.model is not None:
                raise ValueError("speculative config: 'model' is for method draft_model, not ngram")
        elif not isinstance(self.model, str) or not self.model:
            raise ValueError("speculative config: method draft_model needs 'model' (a file, directory or alias)")
        limit = self.disable_by_batch_size
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"speculative config: disable_by_batch_size must be an integer >= 1 or null, "
                             f"got {limit!r}")


def parse_speculative_config(text: str | dict | None) -> SpeculativeConfig | None:
    """``--speculative-config`` (a JSON object, or its text) -> SpeculativeConfig; None stays None."""
    if text is None or isinstance(text, SpeculativeConfig):
        return text
    if isinstance(text, str):
        try:
            text = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"speculative config is not valid JSON: {exc}") from exc
    return SpeculativeConfig.from_dict(text)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        self.model.validate()
        self.cache.validate()
        self.scheduler.validate()
        self.parallel.validate()
        if self.speculative is not None:
            self.speculative.validate()
            if self.scheduler.async_scheduling:
                raise ValueError("async scheduling does not work with speculative decoding: a step's drafts "
                                 "are proposed from the tokens of the step before")
        if self.scheduler.async_scheduling and self.parallel.tensor_parallel_size > 1:
            raise ValueError("async scheduling does not work with tensor parallelism yet: the other ranks "
                             "would need each step's sampled tokens")


def resolve_device_defaults(model: ModelConfig, cuda_available: bool) -> ModelConfig:
    """A new config with the "auto" device, dtype and quantization made concrete.

    device auto: cuda where torch sees a GPU, else cpu. dtype auto: bfloat16 on
    CUDA, float32 elsewhere (the native CPU kernels compute in float32).
    quantization auto on CUDA: none, i.e. dense in the compute dtype, since the
    quantized kernels run on the CPU only; a GGUF file then loads dequantized
    straight to the device instead of keeping host-side blocks.
    """
    device = model.device if model.device != "auto" else ("cuda" if cuda_available else "cpu")
    on_cuda = device.split(":")[0] == "cuda"
    dtype = model.dtype if model.dtype != "auto" else ("bfloat16" if on_cuda else "float32")
    quantization = "none" if on_cuda and model.quantization == "auto" else model.quantization
    return dataclasses.replace(model, device=device, dtype=dtype, quantization=quantization)


def resolve_scheduler_defaults(scheduler: SchedulerConfig, device: str,
                               speculative: bool = False, tensor_parallel: bool = False) -> SchedulerConfig:
    """A new config with the device's token budget where none was given, and async
    scheduling on or off (auto: on CUDA, on one rank, without speculative decoding)."""
    on_cuda = device.split(":")[0] == "cuda"
    budget = scheduler.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS["cuda" if on_cuda else "cpu"]
    overlap = scheduler.async_scheduling
    if overlap is None:
        overlap = on_cuda and not speculative and not tensor_parallel
    return dataclasses.replace(scheduler, max_num_batched_tokens=budget, async_scheduling=overlap)


def replace(cfg, **changes):
    """A new config with ``changes`` applied (configs are frozen)."""
    return dataclasses.replace(cfg, **changes)
