"""SchedulerOutput -> the tensors of one forward pass.

The batch is flat: each scheduled sequence contributes its new tokens back to
back. For every sequence we also record which rows of the hidden states feed
the sampler (its last row, when it samples, or its last 1 + k rows when it
verifies k draft tokens) and which rows give prompt logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch

from tokenloom.model.layers.attention import AttentionMetadata
from tokenloom.runner.block_table import BlockTable
from tokenloom.sample.metadata import SamplingSequence
from tokenloom.sampling_params import SamplingParams
from tokenloom.sched.output import ScheduledRequest, SchedulerOutput
from tokenloom.transfer import host_to_device


@dataclass(frozen=True, slots=True)
class PromptLogprobsSlice:
    """Rows [row_start, row_start + len(target_ids)) of the hidden states predict ``target_ids``,
    which are prompt indices first_index .. first_index + len - 1."""

    request_id: str
    row_start: int
    target_ids: tuple[int, ...]
    first_index: int
    num_logprobs: int
    include_first_none: bool  # the chunk starts at prompt index 0, which has no logprob


@dataclass(frozen=True, slots=True)
class DraftRow:
    """The sample row of a speculating sequence that comes after its first i drafts: it
    samples as the sequence would once those drafts are its output (penalties, min_tokens
    and the random stream's position all see them). A ``SamplingSequence``."""

    sampling_params: SamplingParams
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    seed: int
    eos_token_ids: tuple[int, ...]

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)


@dataclass(frozen=True, slots=True)
class LastSampled:
    """The token ids a step sampled, still on the device, and which sequences sampled
    them: the next step, scheduled before the host saw them, reads its
    ``token_from_last_step`` tokens from here (overlapped scheduling)."""

    token_ids: torch.Tensor  # [num_sample_rows] int64
    sampled: tuple[ScheduledRequest, ...]  # ModelInputs.sampled of that step
    sample_starts: tuple[int, ...]  # and where each one's sample rows begin

    def last_rows(self) -> dict[str, int]:
        """Each sequence's last sample row (the token after its drafts, with speculation)."""
        return {sr.request_id: start + sr.num_sample_rows - 1 for sr, start in zip(self.sampled, self.sample_starts)}


@dataclass(frozen=True, slots=True)
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn_metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [num_sample_rows] int64: rows whose logits are sampled
    sampled: tuple[ScheduledRequest, ...]  # the sequences that sample, each over num_sample_rows rows
    sample_starts: tuple[int, ...]  # where each of ``sampled`` begins among the sample rows
    sample_seqs: tuple[SamplingSequence, ...]  # aligned with sample_rows
    prompt_logprobs: tuple[PromptLogprobsSlice, ...]


def prepare_inputs(out: SchedulerOutput, block_size: int, device: torch.device,
                   block_table: BlockTable, last_sampled: LastSampled | None = None) -> ModelInputs:
    input_ids: list[int] = []
    from_last: tuple[list[int], list[int]] = ([], [])  # (row in this batch, row in last_sampled)
    last_rows: dict[str, int] | None = None  # built at the first sequence that reads last_sampled
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    sample_rows: list[int] = []
    sampled: list[ScheduledRequest] = []
    sample_starts: list[int] = []
    sample_seqs: list[SamplingSequence] = []
    prompt_slices: list[PromptLogprobsSlice] = []
    for sr in out.scheduled:
        row0 = len(input_ids)
        if sr.token_from_last_step:
            if last_rows is None:
                last_rows = last_sampled.last_rows() if last_sampled is not None else {}
            from_last[0].append(row0)
            from_last[1].append(_last_sampled_row(last_rows, sr.request_id))
        span = range(sr.num_computed_tokens, sr.context_len)
        input_ids.extend(sr.token_ids)
        positions.extend(span)
        slots.extend(sr.block_ids[p // block_size] * block_size + p % block_size for p in span)
        starts.append(len(input_ids))
        if sr.sample:
            sample_starts.append(len(sample_rows))
            sample_rows.extend(range(len(input_ids) - sr.num_sample_rows, len(input_ids)))
            sampled.append(sr)
            sample_seqs.extend(_sample_seqs(sr))
        if sr.prompt_logprobs_start is not None:
            prompt_slices.append(_prompt_logprobs_slice(sr, row0))
    seq_lens = [sr.context_len for sr in out.scheduled]
    table = block_table.plan(out)
    # One host buffer, one copy: the step's ints and the block-table entries that are new.
    (ids_t, positions_t, slots_t, seq_lens_t, starts_t, sample_rows_t, seq_rows_t, rows_t, cols_t,
     blocks_t, dest_t, src_t) = _to_device([input_ids, positions, slots, seq_lens, starts, sample_rows,
                                            table.seq_rows, table.rows, table.cols, table.block_ids, *from_last],
                                           device)
    if from_last[0]:
        assert last_sampled is not None  # _last_sampled_row checked it
        ids_t[dest_t] = last_sampled.token_ids[src_t]  # on the device: the host never waits for them
    meta = AttentionMetadata(
        slot_mapping=slots_t,
        block_tables=block_table.apply(rows_t, cols_t, blocks_t, seq_rows_t, table.width),
        seq_lens=seq_lens_t,
        query_start_loc=tuple(starts),
        seq_lens_host=tuple(seq_lens),
        block_size=block_size,
        query_start_loc_tensor=starts_t,
    )
    return ModelInputs(
        input_ids=ids_t,
        positions=positions_t,
        attn_metadata=meta,
        sample_rows=sample_rows_t,
        sampled=tuple(sampled),
        sample_starts=tuple(sample_starts),
        sample_seqs=tuple(sample_seqs),
        prompt_logprobs=tuple(prompt_slices),
    )


def _last_sampled_row(last_rows: dict[str, int], request_id: str) -> int:
    if request_id not in last_rows:
        raise ValueError(f"request {request_id} reads a token of the last step, which did not sample it")
    return last_rows[request_id]


def _sample_seqs(sr: ScheduledRequest) -> list[SamplingSequence]:
    """One per sample row of ``sr``: itself, then one per draft it verifies past the first."""
    drafts = sr.spec_token_ids
    return [sr, *(DraftRow(sr.sampling_params, sr.prompt_token_ids, sr.output_token_ids + drafts[:i],
                           sr.seed, sr.eos_token_ids) for i in range(1, len(drafts) + 1))]


def _prompt_logprobs_slice(sr: ScheduledRequest, row0: int) -> PromptLogprobsSlice:
    """Position p's logits predict prompt index p + 1; the chunk covers positions
    [c, c + n), so it yields indices c + 1 .. min(c + n, P - 1)."""
    c, prompt = sr.num_computed_tokens, sr.prompt_token_ids
    last_index = min(sr.context_len, len(prompt) - 1)
    targets = tuple(prompt[c + 1:last_index + 1])
    return PromptLogprobsSlice(
        request_id=sr.request_id,
        row_start=row0,
        target_ids=targets,
        first_index=c + 1,
        num_logprobs=sr.sampling_params.prompt_logprobs or 0,
        include_first_none=c == 0,
    )


def _to_device(parts: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """int64 device tensors of ``parts``, carried by one (non-blocking, on CUDA) copy."""
    flat = host_to_device(torch.tensor(list(chain.from_iterable(parts)), dtype=torch.int64), device)
    return list(flat.split([len(part) for part in parts]))
