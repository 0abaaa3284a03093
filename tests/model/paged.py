"""Test-side stand-in for the runner: KV caches and AttentionMetadata built by hand."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from tokenloom.config import ModelArchConfig
from tokenloom.model.layers.attention import AttentionMetadata, kv_row_width
from tokenloom.model.llama import LlamaForCausalLM

UNWRITTEN = 64.0


def make_kv_caches(config: ModelArchConfig, num_blocks: int, block_size: int,
                   dtype: torch.dtype, device: torch.device | str = "cpu",
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, config.num_key_value_heads, kv_row_width(config.head_dim, dtype))
    # Filled with a large finite value so that attending to a slot nobody wrote
    # visibly changes the result. Not NaN: batched decode multiplies masked
    # padding slots by an exact zero weight, which only finite values survive.
    # (An int8 row of 64s reads as 64 times its scale bytes 0x40404040, i.e. 3.0.)
    return [(torch.full(shape, UNWRITTEN, dtype=dtype, device=device),
             torch.full(shape, UNWRITTEN, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)]


@dataclass
class Sequence:
    """One sequence's token ids, its (fixed) block table and how many tokens are cached."""

    token_ids: list[int]
    block_table: list[int]
    num_computed_tokens: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)


def build_step(seqs: list[Sequence], num_new: list[int], block_size: int,
               device: torch.device | str = "cpu",
               ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """input_ids, positions and metadata for feeding ``num_new[i]`` tokens of ``seqs[i]``."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    for seq, n in zip(seqs, num_new, strict=True):
        start = seq.num_computed_tokens
        for pos in range(start, start + n):
            ids.append(seq.token_ids[pos])
            positions.append(pos)
            slots.append(seq.block_table[pos // block_size] * block_size + pos % block_size)
        query_start_loc.append(query_start_loc[-1] + n)
    width = max(len(seq.block_table) for seq in seqs)
    tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs]
    seq_lens = [seq.num_computed_tokens + n for seq, n in zip(seqs, num_new)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int64, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=device),
        query_start_loc=tuple(query_start_loc),
        seq_lens_host=tuple(seq_lens),
        block_size=block_size,
        query_start_loc_tensor=torch.tensor(query_start_loc, dtype=torch.int64, device=device),
    )
    return (torch.tensor(ids, dtype=torch.int64, device=device),
            torch.tensor(positions, dtype=torch.int64, device=device), meta)


@torch.inference_mode()
def run_step(model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
             seqs: list[Sequence], num_new: list[int], block_size: int) -> list[torch.Tensor]:
    """One forward over the step; returns each sequence's logits for its new tokens
    ``[num_new[i], vocab]`` (float32, on cpu) and advances ``num_computed_tokens``."""
    device = kv_caches[0][0].device
    input_ids, positions, meta = build_step(seqs, num_new, block_size, device)
    logits = model.compute_logits(model(input_ids, positions, kv_caches, meta)).cpu()
    out = []
    for i, (seq, n) in enumerate(zip(seqs, num_new)):
        out.append(logits[meta.query_start_loc[i]:meta.query_start_loc[i + 1]])
        seq.num_computed_tokens += n
    return out


def prefill_logits(model: LlamaForCausalLM, token_ids: list[int], block_size: int = 4,
                   chunks: list[int] | None = None) -> torch.Tensor:
    """Logits ``[len(token_ids), vocab]`` of a whole prompt, fed in ``chunks``."""
    config = dataclasses.replace(model.config, num_key_value_heads=model.shard.num_kv_heads)  # this rank's heads
    num_blocks = -(-len(token_ids) // block_size)
    # Scattered, descending block ids: block order must come from the table alone.
    table = [2 * num_blocks - 1 - 2 * i for i in range(num_blocks)]
    device = next(model.parameters()).device
    caches = make_kv_caches(config, 2 * num_blocks, block_size,
                            next(model.parameters()).dtype, device)
    seq = Sequence(list(token_ids), table)
    parts = [run_step(model, caches, [seq], [n], block_size)[0]
             for n in (chunks or [len(token_ids)])]
    return torch.cat(parts)
