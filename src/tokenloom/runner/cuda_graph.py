"""Decode steps over static, padded buffers: replayed as CUDA graphs on CUDA.

A decode step of a small model is a few hundred kernel launches of a few
microseconds each; on a GPU the host issuing them, not the GPU, sets the pace.
A CUDA graph records a step's launches once and replays them with one call,
but it replays fixed shapes and fixed addresses. So decode steps run over
static buffers sized for the largest captured batch, padded up to the next
captured size (``graph_buckets.py``)::

    static buffers (B = largest size, W = blocks per sequence)   padding rows
      input_ids        [B]                                        0
      positions        [B]                                        0
      slot_mapping     [B]                                        -1 (the KV write skips it)
      seq_lens         [B]                                        0  (attends to nothing: output 0)
      query_start_loc  [B + 1] = 0, 1, ..., B  (never changes)    i
      block_tables     [B, W]                                     row of 0

    a decode step of n sequences, bucket b >= n:
      rows 0..n-1 <- the step's device tensors (device-to-device copies, no host sync)
      rows n..b-1 <- padding
      CUDA: graph[b].replay()   |   CPU: the same forward over rows 0..b-1, eagerly
      -> hidden [n, hidden_size], logits [n, vocab_size] (rows 0..n-1)

The graph holds the whole forward, embedding to logits of every row; sampling
runs eagerly after it. The attention metadata inside a graph reads no host
value of the step: its host tuples are the bucket's own (one token per row,
and every row's length bounded by ``max_seq_len``, which sizes the launches).
The CPU runs the same static path without capture so that CI tests its logic;
the engine builds it on CUDA only (padding would cost the CPU real work).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tokenloom.model.layers.attention import AttentionMetadata
from tokenloom.runner.graph_buckets import bucket_for
from tokenloom.runner.inputs import ModelInputs

logger = logging.getLogger(__name__)

PAD_SLOT = -1  # a KV slot that every write path skips
# Graphs size their attention launches for this many keys per sequence (vLLM's
# max_seq_len_to_capture): a bound of max_model_len (128k for Llama 3.1) would launch
# 512 split-KV segments per head at batch 1, nearly all empty. Longer contexts run eagerly.
MAX_SEQ_LEN_TO_CAPTURE = 8192
_WARMUP_RUNS = 2  # before each capture: compiles kernels, sets up cuBLAS and allocator state
_GiB = 1 << 30


@dataclass(frozen=True, slots=True)
class _StaticInputs:
    """The device buffers every bucket's forward reads (its first b rows)."""

    input_ids: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    slot_mapping: torch.Tensor  # [B] int64
    seq_lens: torch.Tensor  # [B] int64
    query_start_loc: torch.Tensor  # [B + 1] int64: 0, 1, ..., B
    block_tables: torch.Tensor  # [B, W] int64

    @classmethod
    def padding(cls, size: int, max_blocks_per_seq: int, device: torch.device) -> _StaticInputs:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=device)

        return cls(zeros(size), zeros(size), torch.full((size,), PAD_SLOT, dtype=torch.int64, device=device),
                   zeros(size), torch.arange(size + 1, dtype=torch.int64, device=device),
                   zeros(size, max_blocks_per_seq))

    def metadata(self, b: int, max_seq_len: int, block_size: int) -> AttentionMetadata:
        """Bucket b's metadata: views of the first b rows; host values that depend on b alone."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            block_tables=self.block_tables[:b],
            seq_lens=self.seq_lens[:b],
            query_start_loc=tuple(range(b + 1)),
            # Not the rows' lengths (those live on the device) but a bound on each: what
            # sizes the attention launches (the split-KV grid, the reference's gather).
            seq_lens_host=(max_seq_len,) * b,
            block_size=block_size,
            query_start_loc_tensor=self.query_start_loc[:b + 1],
        )

    def fill(self, inputs: ModelInputs, n: int, b: int) -> None:
        """Rows 0..n-1 from the step, rows n..b-1 padding (rows past b are not read)."""
        meta = inputs.attn_metadata
        for dst, src, pad in ((self.input_ids, inputs.input_ids, 0), (self.positions, inputs.positions, 0),
                              (self.slot_mapping, meta.slot_mapping, PAD_SLOT), (self.seq_lens, meta.seq_lens, 0)):
            dst[:n].copy_(src, non_blocking=True)
            dst[n:b].fill_(pad)
        # Columns past the step's width keep older block ids: no row reads past its own length.
        self.block_tables[:n, :meta.block_tables.shape[1]].copy_(meta.block_tables, non_blocking=True)
        self.block_tables[n:b].zero_()


@dataclass(frozen=True, slots=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [b, hidden_size]: the graph's output buffers, rewritten by each replay
    logits: torch.Tensor  # [b, vocab_size] float32


class GraphRunner:
    """Runs the decode-only steps of up to ``max(sizes)`` sequences over static buffers.

    Contract: ``run(inputs)`` returns ``(hidden [n, hidden_size], logits [n, vocab_size])``
    for a decode-only step of n sequences that fits a bucket, computed by replaying
    that bucket's graph (CUDA) or by the same padded forward run eagerly (elsewhere),
    and writes the step's K/V exactly as the eager forward does (padding writes
    nothing); for any other step it returns None and touches nothing. The outputs
    are views of buffers the next ``run`` overwrites: use them within the step.
    """

    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 sizes: tuple[int, ...], max_blocks_per_seq: int, max_seq_len: int, block_size: int,
                 device: torch.device) -> None:
        if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"graph batch sizes must be ascending and >= 1, got {sizes}")
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sizes
        self.max_seq_len = min(max_seq_len, MAX_SEQ_LEN_TO_CAPTURE)
        self.device = device
        self._static = _StaticInputs.padding(sizes[-1], max_blocks_per_seq, device)
        self._metas = {b: self._static.metadata(b, self.max_seq_len, block_size) for b in sizes}
        self._graphs: dict[int, _Captured] = {}
        if device.type == "cuda":
            self._capture_all()

    def run(self, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor] | None:
        meta = inputs.attn_metadata
        if not meta.is_decode_only or meta.max_seq_len > self.max_seq_len:
            return None  # prompt chunks, verify steps (rows per sequence > 1), contexts past the bound
        n = meta.num_seqs
        b = bucket_for(n, self.sizes)
        if b is None:
            return None
        self._static.fill(inputs, n, b)
        captured = self._graphs.get(b)
        if captured is None:
            hidden, logits = self._forward(b)
        else:
            captured.graph.replay()
            hidden, logits = captured.hidden, captured.logits
        return hidden[:n], logits[:n]

    def _forward(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded forward of bucket b: hidden [b, hidden_size], logits [b, vocab_size]."""
        s = self._static
        hidden = self.model(s.input_ids[:b], s.positions[:b], self.kv_caches, self._metas[b])
        return hidden, self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Largest first, all in one memory pool: a smaller graph reuses the larger ones'
        memory (only one graph runs at a time). The buffers hold padding throughout, so
        neither the warm-ups nor the captures write the KV cache."""
        pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        started = time.perf_counter()
        for b in tqdm(self.sizes[::-1], desc="capturing CUDA graphs", unit="graph"):
            self._graphs[b] = self._capture(b, pool)
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info("captured %d CUDA graphs for decode batches of 1..%d sequences in %.1fs, %.2f GiB",
                    len(self.sizes), self.sizes[-1], time.perf_counter() - started, used / _GiB)

    def _capture(self, b: int, pool: tuple[int, int]) -> _Captured:
        for _ in range(_WARMUP_RUNS):
            self._forward(b)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            hidden, logits = self._forward(b)
        return _Captured(graph, hidden, logits)


def graphs_unsupported(model: torch.nn.Module, kv_cache_dtype: torch.dtype, block_size: int) -> str | None:
    """Why a CUDA model cannot be captured (None: it can). Padding must be skipped by
    the KV write and attention without a host sync: the Triton kernels do that; the
    PyTorch reference path they hand int8 caches and small blocks to does not."""
    name = model.ops.name
    if name != "triton":
        return f"the {name} attention backend (graphs need triton)"
    if kv_cache_dtype == torch.int8:
        return "an int8 KV cache (its write takes the PyTorch path)"
    if block_size < 16:
        return f"KV blocks of {block_size} tokens (attention takes the PyTorch path below 16)"
    return None


def build_graph_runner(model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                       sizes: tuple[int, ...], max_blocks_per_seq: int, max_seq_len: int, block_size: int,
                       device: torch.device) -> GraphRunner | None:
    """A graph runner over ``sizes`` (none when empty, or on CUDA where the model cannot be captured)."""
    if not sizes:
        return None
    reason = graphs_unsupported(model, kv_caches[0][0].dtype, block_size) if device.type == "cuda" else None
    if reason is not None:
        logger.info("CUDA graphs off, decode steps run eagerly: %s", reason)
        return None
    return GraphRunner(model, kv_caches, sizes, max_blocks_per_seq, max_seq_len, block_size, device)
