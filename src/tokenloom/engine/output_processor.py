"""Engine-side bookkeeping of user requests: text, stop strings, logprobs, deltas.

A user request with n samples is n scheduler sequences. After each step the
processor turns the sequences that got tokens into one RequestOutput *delta*
per user request (only what is new since the previous delta).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tokenloom.engine.detokenizer import IncrementalDetokenizer
from tokenloom.engine.tokenizer import Tokenizer
from tokenloom.request import CompletionOutput, PositionLogprobs, Request, RequestOutput, RequestStatus
from tokenloom.sampling_params import SamplingParams


@dataclass(slots=True)
class _SequenceState:
    detokenizer: IncrementalDetokenizer
    pending_text: str = ""  # released by the detokenizer, not yet sent
    num_tokens_sent: int = 0
    cumulative_logprob: float | None = None
    finished: bool = False


@dataclass(slots=True)
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: dict[str, _SequenceState] = field(default_factory=dict)
    prompt_logprobs_sent: bool = False
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences.values())


class OutputProcessor:
    """Owns per-request text state. ``process`` is called with the sequences the
    scheduler updated; it returns stop-string hits for the engine to finish."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _RequestState] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
            params: SamplingParams, sequence_ids: list[str]) -> None:
        state = _RequestState(request_id, prompt, prompt_token_ids, params)
        for seq_id in sequence_ids:
            state.sequences[seq_id] = _SequenceState(IncrementalDetokenizer(
                self.tokenizer, skip_special_tokens=params.skip_special_tokens, stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
                prompt_token_ids=prompt_token_ids))
        self._requests[request_id] = state

    def remove(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def sequence_ids(self, request_id: str) -> list[str]:
        state = self._requests.get(request_id)
        return list(state.sequences) if state else []

    def stop_string_of(self, req: Request) -> str | None:
        return self._requests[req.parent_id].sequences[req.request_id].detokenizer.stop_matched

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def stop_string_hits(self, updated: list[Request]) -> list[Request]:
        """Feed new tokens to the detokenizers; return live sequences that hit a stop string.

        A step may bring several tokens (speculative decoding): those after the one that
        completed a stop string are dropped, and a sequence that the scheduler finished
        on one of them (EOS, max_tokens) is finished by the stop string instead."""
        hits = []
        for req in updated:
            seq = self._requests[req.parent_id].sequences[req.request_id]
            seq.pending_text += seq.detokenizer.add_tokens(req.output_token_ids[seq.num_tokens_sent:])
            if not seq.detokenizer.finished:
                continue
            kept = seq.detokenizer.num_tokens
            cut = len(req.output_token_ids) > kept
            del req.output_token_ids[kept:], req.output_logprobs[kept:]
            if not req.is_finished:
                hits.append(req)
            elif cut:
                req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, seq.detokenizer.stop_matched
        return hits

    def make_outputs(self, updated: list[Request]) -> list[RequestOutput]:
        """One delta per user request touched this step; finished requests are forgotten."""
        deltas: dict[str, list[CompletionOutput]] = {}
        for req in updated:
            deltas.setdefault(req.parent_id, []).append(self._sequence_delta(req))
        outputs = []
        for request_id, completions in deltas.items():
            state = self._requests[request_id]
            outputs.append(RequestOutput(
                request_id=request_id,
                prompt=state.prompt,
                prompt_token_ids=state.prompt_token_ids,
                outputs=sorted(completions, key=lambda c: c.index),
                finished=state.finished,
                prompt_logprobs=self._take_prompt_logprobs(state, updated),
                num_cached_tokens=state.num_cached_tokens,
            ))
            if state.finished:
                self.remove(request_id)
        return outputs

    def _sequence_delta(self, req: Request) -> CompletionOutput:
        state = self._requests[req.parent_id]
        seq = state.sequences[req.request_id]
        if req.sample_index == 0:
            state.num_cached_tokens = req.num_cached_tokens
        start = seq.num_tokens_sent
        new_ids = req.output_token_ids[start:]
        seq.num_tokens_sent = len(req.output_token_ids)
        text, seq.pending_text = seq.pending_text, ""
        if req.is_finished:
            text += seq.detokenizer.flush()
            seq.finished = True
        logprobs = None
        if state.params.logprobs is not None:
            logprobs = [self._decorate(e) for e in req.output_logprobs[start:]]
            seq.cumulative_logprob = (seq.cumulative_logprob or 0.0) + sum(
                e[t].logprob for e, t in zip(logprobs, new_ids))
        return CompletionOutput(
            index=req.sample_index, text=text, token_ids=new_ids,
            cumulative_logprob=seq.cumulative_logprob, logprobs=logprobs,
            finish_reason=req.status.finish_reason, stop_reason=req.stop_reason)

    def _take_prompt_logprobs(self, state: _RequestState,
                              updated: list[Request]) -> list[PositionLogprobs | None] | None:
        if state.params.prompt_logprobs is None or state.prompt_logprobs_sent:
            return None
        first = next((r for r in updated if r.parent_id == state.request_id and r.sample_index == 0), None)
        if first is None or len(first.prompt_logprobs) < first.num_prompt_tokens:
            return None
        state.prompt_logprobs_sent = True
        return [None if e is None else self._decorate(e) for e in first.prompt_logprobs]

    def _decorate(self, entry: PositionLogprobs) -> PositionLogprobs:
        return {tok: dataclasses.replace(lp, decoded_token=self.tokenizer.decode_token(tok))
                for tok, lp in entry.items()}
