"""History transforms (logit_bias, min_tokens, penalties) against numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenloom.sample.metadata import build_sampling_metadata
from tokenloom.sample.penalties import apply_logit_bias, apply_min_tokens, apply_penalties
from tokenloom.sampling_params import SamplingParams
from tokenloom.sched.output import ScheduledRequest

VOCAB = 64


def make_seq(params: SamplingParams, prompt=(1,), output=(), seed=0, eos=(2,)) -> ScheduledRequest:
    return ScheduledRequest(
        request_id=f"r{seed}", token_ids=(prompt[-1],), num_computed_tokens=0, num_new_tokens=1,
        block_ids=(), sample=True, sampling_params=params, prompt_token_ids=tuple(prompt),
        output_token_ids=tuple(output), seed=seed, eos_token_ids=tuple(eos))


def random_tokens(rng: np.random.Generator, n: int) -> tuple[int, ...]:
    # A small id range so that tokens repeat and counts exceed 1.
    return tuple(int(t) for t in rng.integers(0, 12, size=n))


def ref_penalties(logits: np.ndarray, seq: ScheduledRequest) -> np.ndarray:
    out = logits.astype(np.float64).copy()
    p = seq.sampling_params
    for tok in set(seq.prompt_token_ids) | set(seq.output_token_ids):
        out[tok] = out[tok] / p.repetition_penalty if out[tok] > 0 else out[tok] * p.repetition_penalty
    counts = np.bincount(np.asarray(seq.output_token_ids, dtype=np.int64), minlength=VOCAB)
    return out - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


def test_penalties_match_reference_on_mixed_rows() -> None:
    rng = np.random.default_rng(0)
    params = [
        SamplingParams(),  # no penalty: row untouched
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.7),
        SamplingParams(frequency_penalty=0.5),
        SamplingParams(presence_penalty=-1.2),
        SamplingParams(repetition_penalty=1.5, frequency_penalty=-0.4, presence_penalty=0.8),
    ]
    seqs = [make_seq(p, random_tokens(rng, 5), random_tokens(rng, 9), seed=i) for i, p in enumerate(params)]
    logits = torch.from_numpy(rng.normal(scale=3.0, size=(len(seqs), VOCAB)).astype(np.float32))
    metadata = build_sampling_metadata(seqs, VOCAB, "cpu")
    assert metadata.penalties is not None and metadata.penalties.prompt_mask is not None
    result = apply_penalties(logits.clone(), metadata.penalties)
    expected = np.stack([ref_penalties(logits[i].numpy(), s) for i, s in enumerate(seqs)])
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(result[0], logits[0])


def test_repetition_penalty_counts_prompt_but_frequency_only_output() -> None:
    seq_rep = make_seq(SamplingParams(repetition_penalty=2.0), prompt=(3,), output=(5,))
    seq_freq = make_seq(SamplingParams(frequency_penalty=1.0, presence_penalty=0.5), prompt=(3,), output=(5, 5))
    logits = torch.zeros(2, VOCAB)
    logits[:, 3], logits[:, 5], logits[:, 7] = 4.0, -4.0, 1.0
    metadata = build_sampling_metadata([seq_rep, seq_freq], VOCAB, "cpu")
    out = apply_penalties(logits.clone(), metadata.penalties)
    assert out[0, 3].item() == 2.0 and out[0, 5].item() == -8.0 and out[0, 7].item() == 1.0
    assert out[1, 3].item() == 4.0 and out[1, 5].item() == -6.5 and out[1, 7].item() == 1.0


def test_penalty_tensors_only_for_features_in_use() -> None:
    seqs = [make_seq(SamplingParams(frequency_penalty=0.3), prompt=(4, 4), output=(6, 6, 6)),
            make_seq(SamplingParams(), prompt=(1,), output=(8,))]
    penalties = build_sampling_metadata(seqs, VOCAB, "cpu").penalties
    assert penalties is not None and penalties.prompt_mask is None  # no repetition penalty asked
    assert penalties.output_counts[0, 6].item() == 3
    assert penalties.output_counts.sum().item() == 3  # the penalty-free row is not counted
    plain = build_sampling_metadata([make_seq(SamplingParams(), output=(1, 2))], VOCAB, "cpu")
    assert plain.penalties is None and plain.logit_bias is None and plain.min_tokens_mask is None


def test_logit_bias_matches_reference() -> None:
    rng = np.random.default_rng(1)
    biases = [{3: 5.0, 10: -100.0}, None, {3: -2.5, 63: 100.0, 0: 0.25}]
    seqs = [make_seq(SamplingParams(logit_bias=b), seed=i) for i, b in enumerate(biases)]
    logits = torch.from_numpy(rng.normal(size=(3, VOCAB)).astype(np.float32))
    metadata = build_sampling_metadata(seqs, VOCAB, "cpu")
    result = apply_logit_bias(logits.clone(), metadata.logit_bias)
    expected = logits.numpy().astype(np.float64).copy()
    for row, bias in enumerate(biases):
        for tok, value in (bias or {}).items():
            expected[row, tok] += value
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_output", [0, 2, 3, 5])
def test_min_tokens_masks_eos_and_stop_ids_until_reached(num_output: int) -> None:
    params = SamplingParams(min_tokens=3, stop_token_ids=[7, 9], ignore_eos=True)
    # eos 200 lies past the logits' vocabulary and is dropped rather than indexed.
    seq = make_seq(params, output=tuple(range(10, 10 + num_output)), eos=(2, 5, 200))
    other = make_seq(SamplingParams(min_tokens=1, stop_token_ids=[11]), output=(4,))
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(2))
    metadata = build_sampling_metadata([seq, other], VOCAB, "cpu")
    if num_output >= 3:
        assert metadata.min_tokens_mask is None
        return
    result = apply_min_tokens(logits.clone(), metadata.min_tokens_mask)
    expected = logits.clone()
    expected[0, [2, 5, 7, 9]] = float("-inf")
    assert torch.equal(result, expected)
