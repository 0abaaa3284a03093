"""ModelRunner: SchedulerOutput -> one forward over the mixed batch -> sampling -> ModelOutput.

It owns the KV cache tensors (one (k, v) pair per layer) and the sampler; it
knows which rows to sample but nothing of stop conditions or text.

Under tensor parallelism every rank has a runner over its part of the model and
of the KV cache (its own kv heads, the same block ids). Rank 0's runner hands each
step's ``SchedulerOutput`` to the others (``broadcast``) before its forward; theirs
run the same forward (``run_peer_step``) and sample nothing.

Decode-only steps go through a ``GraphRunner`` (``cuda_graph.py``) when one is
built (``cudagraph_sizes``: the engine asks for one on CUDA): CUDA graphs
replayed over static, padded buffers.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokenloom.config import ModelArchConfig
from tokenloom.model.layers.attention import kv_row_width
from tokenloom.request import Logprob, PositionLogprobs
from tokenloom.runner.block_table import BlockTable
from tokenloom.runner.cuda_graph import GraphRunner, build_graph_runner
from tokenloom.runner.host_allocator import keep_freed_memory, release_freed_memory
from tokenloom.runner.inputs import LastSampled, ModelInputs, PromptLogprobsSlice, prepare_inputs
from tokenloom.sample import Sampler, SamplerOutput, build_sampling_metadata, compute_prompt_logprobs
from tokenloom.sample.metadata import AllowedTokens, DraftSamples
from tokenloom.sched.output import ModelOutput, SampledToken, SchedulerOutput
from tokenloom.spec_decode.verify import num_accepted
from tokenloom.transfer import HostCopies, host_to_device, to_device, to_host

if TYPE_CHECKING:
    from tokenloom.structured import GrammarBitmask


@dataclass(frozen=True, slots=True)
class LaunchedStep:
    """A step queued on the device: its inputs, hidden states [num_tokens, hidden_size]
    (prompt logprobs read them) and the copies of its sampled tokens (None: none sampled)."""

    inputs: ModelInputs
    hidden: torch.Tensor
    copies: HostCopies | None


class ModelRunner:
    def __init__(self, model: torch.nn.Module, arch: ModelArchConfig, num_blocks: int,
                 block_size: int, kv_cache_dtype: torch.dtype, device: torch.device,
                 max_num_seqs: int = 256, max_model_len: int | None = None,
                 broadcast: Callable[[SchedulerOutput], object] | None = None,
                 cudagraph_sizes: tuple[int, ...] = ()) -> None:
        """``cudagraph_sizes``: the decode batch sizes of a ``GraphRunner`` (captured on
        CUDA, run as the same padded static forward elsewhere); empty: every step eager."""
        self.model = model
        self.arch = arch
        self.broadcast = broadcast
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()
        max_len = max_model_len or arch.max_position_embeddings
        # Rows for more sequences than one step holds: n > 1 siblings and preempted ones come and go.
        self.block_table = BlockTable(2 * max_num_seqs, -(-max_len // block_size), device)
        if self.device.type == "cpu":
            release_freed_memory()  # what loading freed (blocks, once their tiles were built) goes back
            keep_freed_memory()  # activations are reused from step to step, not faulted in again
        shape = (num_blocks, block_size, model.shard.num_kv_heads, kv_row_width(arch.head_dim, kv_cache_dtype))
        # Not zeroed: attention reads only slots written by this step or earlier ones
        # (the padded PyTorch decode path zeroes its padding itself). Zeroing the
        # default 4 GiB took 1.5 s of a 10 s startup.
        self.kv_caches = [
            (torch.empty(shape, dtype=kv_cache_dtype, device=device),
             torch.empty(shape, dtype=kv_cache_dtype, device=device))
            for _ in range(arch.num_hidden_layers)
        ]
        self._last_sampled: LastSampled | None = None  # the last launched step's sampled ids
        self.graphs: GraphRunner | None = build_graph_runner(
            model, self.kv_caches, cudagraph_sizes, self.block_table.table.shape[1], max_len, block_size, device)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, grammar: GrammarBitmask | None = None,
                draft_probs: Mapping[str, torch.Tensor] | None = None) -> ModelOutput:
        """``grammar``: the allowed tokens of the step's constrained sample rows (structured
        output). ``draft_probs``: per sequence whose drafts a draft model sampled, the
        distributions they came from [k, vocab] (rejection sampling of its random rows)."""
        return self.collect(self.launch(out, grammar, draft_probs))

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, grammar: GrammarBitmask | None = None,
               draft_probs: Mapping[str, torch.Tensor] | None = None) -> LaunchedStep:
        """Queue the step on the device and start copying its sampled tokens back; nothing
        waits (on CUDA). Its sampled ids stay on the device for the next step's
        ``token_from_last_step`` sequences (overlapped scheduling)."""
        inputs, hidden, result = self.forward_and_sample(out, grammar, draft_probs)
        if result is None:
            return LaunchedStep(inputs, hidden, None)
        self._last_sampled = LastSampled(result.token_ids, inputs.sampled, inputs.sample_starts)
        copies = HostCopies([result.token_ids, result.logprob_token_ids, result.logprobs, result.sampled_ranks])
        return LaunchedStep(inputs, hidden, copies)

    @torch.inference_mode()
    def collect(self, step: LaunchedStep) -> ModelOutput:
        """The step's results on the host: the one wait of a step."""
        inputs = step.inputs
        rows = () if step.copies is None else _to_sampled_tokens(
            step.copies.wait(), [s.sampling_params.logprobs for s in inputs.sample_seqs])
        prompt_logprobs = {s.request_id: self._prompt_logprobs(s, logits)
                           for s, logits in zip(inputs.prompt_logprobs, self._prompt_logits(inputs, step.hidden))}
        return ModelOutput(
            request_ids=tuple(sr.request_id for sr in inputs.sampled),
            sampled=_accepted_tokens(inputs, rows),
            prompt_logprobs=prompt_logprobs,
        )

    def forward_and_sample(self, out: SchedulerOutput, grammar: GrammarBitmask | None = None,
                           draft_probs: Mapping[str, torch.Tensor] | None = None,
                           ) -> tuple[ModelInputs, torch.Tensor, SamplerOutput | None]:
        """The step on the device, queued without waiting for it: inputs, hidden states
        [num_tokens, hidden_size] and the sampler's device tensors (None: nothing samples).
        Call it under ``torch.inference_mode()`` (``execute`` does)."""
        inputs, hidden, logits = self.forward(out)
        if logits is None:
            return inputs, hidden, None
        meta = build_sampling_metadata(inputs.sample_seqs, self.arch.vocab_size, self.device,
                                       self._allowed_tokens(inputs, grammar), _draft_samples(inputs, draft_probs))
        return inputs, hidden, self.sampler(logits, meta)

    def forward(self, out: SchedulerOutput) -> tuple[ModelInputs, torch.Tensor, torch.Tensor | None]:
        """Inputs, hidden states [num_tokens, hidden_size] and the sample rows' logits
        [num_sample_rows, vocab_size] (None: nothing samples). Under ``torch.inference_mode()``."""
        if self.broadcast is not None:
            self.broadcast(_for_peers(out))
        inputs = prepare_inputs(out, self.block_size, self.device, self.block_table, self._last_sampled)
        # Prompt logprobs read a step's hidden states late (after the next step is launched,
        # when steps overlap): not from a graph's outputs, which the next replay rewrites.
        graphs = self.graphs if not inputs.prompt_logprobs else None
        replayed = graphs.run(inputs) if graphs is not None else None
        if replayed is not None:
            hidden, logits = replayed  # every row's: [n, hidden_size], [n, vocab_size]
            return inputs, hidden, logits[inputs.sample_rows] if inputs.sampled else None
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches,
                            inputs.attn_metadata)  # [num_tokens, hidden_size]
        if not inputs.sampled:
            return inputs, hidden, None
        return inputs, hidden, self.model.compute_logits(hidden[inputs.sample_rows])

    def _allowed_tokens(self, inputs: ModelInputs, grammar: GrammarBitmask | None) -> AllowedTokens | None:
        if grammar is None or not grammar.request_ids:
            return None
        first_row = dict(zip((sr.request_id for sr in inputs.sampled), inputs.sample_starts))
        seen: Counter[str] = Counter()
        rows = []
        for request_id in grammar.request_ids:  # a sequence's bitmask rows follow its sample rows
            rows.append(first_row[request_id] + seen[request_id])
            seen[request_id] += 1
        bitmask = host_to_device(grammar.bitmask, self.device)
        if rows == list(range(len(inputs.sample_seqs))):
            return AllowedTokens(None, bitmask)
        return AllowedTokens(to_device(rows, torch.int64, self.device), bitmask)

    @torch.inference_mode()
    def run_peer_step(self, out: SchedulerOutput) -> None:
        """A tensor-parallel worker's step: every forward and logits exchange that rank 0's
        ``execute`` makes, in its order; sampling is rank 0's alone."""
        inputs, hidden, _ = self.forward(out)
        self._prompt_logits(inputs, hidden)

    def _prompt_logits(self, inputs: ModelInputs, hidden: torch.Tensor) -> list[torch.Tensor | None]:
        """The logits [n, vocab] of each prompt-logprobs slice's rows (None: it has none)."""
        return [self.model.compute_logits(hidden[s.row_start:s.row_start + len(s.target_ids)])
                if s.target_ids else None for s in inputs.prompt_logprobs]

    def _prompt_logprobs(self, s: PromptLogprobsSlice, logits: torch.Tensor | None) -> list[PositionLogprobs | None]:
        entries: list[PositionLogprobs | None] = [None] if s.include_first_none else []
        if logits is None:
            return entries
        targets = to_device(s.target_ids, torch.int64, self.device)
        ids, logprobs, ranks = (t.tolist() for t in to_host(compute_prompt_logprobs(logits, targets,
                                                                                      s.num_logprobs)))
        entries.extend(_position_logprobs(ids[i], logprobs[i], ranks[i]) for i in range(len(s.target_ids)))
        return entries


def _for_peers(out: SchedulerOutput) -> SchedulerOutput:
    """What the other tensor-parallel ranks need of a step: its tokens, positions and
    blocks, not the sampling history (each sequence's prompt and output ids, which only
    rank 0's sampler reads; a prompt is kept where its logprobs are due, for their rows).
    At 64 sequences of 2.5k tokens that history was 0.5 MB and 5 ms of pickling a step."""
    scheduled = tuple(dataclasses.replace(sr, output_token_ids=(), prompt_token_ids=(
        sr.prompt_token_ids if sr.prompt_logprobs_start is not None else ())) for sr in out.scheduled)
    return dataclasses.replace(out, scheduled=scheduled)


def _draft_samples(inputs: ModelInputs, draft_probs: Mapping[str, torch.Tensor] | None) -> DraftSamples | None:
    """The random sample rows that verify a draft model's tokens, with their q rows."""
    if not draft_probs:
        return None
    rows: list[int] = []
    token_ids: list[int] = []
    probs = []
    for sr, start in zip(inputs.sampled, inputs.sample_starts):
        q = draft_probs.get(sr.request_id)
        if q is None or not sr.spec_token_ids or sr.sampling_params.greedy:
            continue
        k = len(sr.spec_token_ids)
        rows.extend(range(start, start + k))
        token_ids.extend(sr.spec_token_ids)
        probs.append(q[:k])
    return DraftSamples(rows, token_ids, torch.cat(probs)) if rows else None


def _accepted_tokens(inputs: ModelInputs, rows: tuple[SampledToken, ...]) -> tuple[tuple[SampledToken, ...], ...]:
    """Each sequence's tokens of the step: its accepted drafts and the target's token after them."""
    tokens = []
    for sr, start in zip(inputs.sampled, inputs.sample_starts):
        if not sr.spec_token_ids:
            tokens.append(rows[start:start + 1])
            continue
        own = rows[start:start + sr.num_sample_rows]
        tokens.append(own[:num_accepted([t.token_id for t in own], sr.spec_token_ids) + 1])
    return tuple(tokens)


def _to_sampled_tokens(host: list[torch.Tensor | None], wanted: list[int | None]) -> tuple[SampledToken, ...]:
    """``host``: the sampler's token ids, logprob ids, logprobs and ranks, on the host."""
    token_ids = host[0].tolist()
    if host[2] is None:
        return tuple(SampledToken(t) for t in token_ids)
    ids, values, ranks = (t.tolist() for t in host[1:])
    tokens = []
    for i, token in enumerate(token_ids):
        k = wanted[i]
        entry = None if k is None else _position_logprobs(ids[i][:k + 1], values[i][:k + 1], ranks[i])
        tokens.append(SampledToken(token, entry))
    return tuple(tokens)


def _position_logprobs(ids: list[int], values: list[float], chosen_rank: int) -> PositionLogprobs:
    """Column 0 is the chosen token (with its true rank); columns 1.. are the top-k, ranks 1..k."""
    entry = {ids[0]: Logprob(values[0], chosen_rank)}
    for rank, (tok, value) in enumerate(zip(ids[1:], values[1:]), start=1):
        entry.setdefault(tok, Logprob(value, rank))
    return entry
