"""Sampler: filters against numpy references, seeded streams, distribution, logprobs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tokenloom.sample import Sampler, build_sampling_metadata, compute_prompt_logprobs
from tokenloom.sample import filters
from tokenloom.sample.filters import apply_min_p, apply_top_k, apply_top_k_top_p
from tokenloom.sample.noise import exponential_noise, mix32
from tokenloom.sampling_params import SamplingParams
from tokenloom.sched.output import ScheduledRequest

VOCAB = 64
sampler = Sampler()


def make_seq(params: SamplingParams, prompt=(1,), output=(), seed=0, eos=(2,)) -> ScheduledRequest:
    return ScheduledRequest(
        request_id=f"r{seed}", token_ids=(prompt[-1],), num_computed_tokens=0, num_new_tokens=1,
        block_ids=(), sample=True, sampling_params=params, prompt_token_ids=tuple(prompt),
        output_token_ids=tuple(output), seed=seed, eos_token_ids=tuple(eos))


def random_logits(num_rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.normal(scale=scale, size=(num_rows, vocab)).astype(np.float32))


# --- numpy references -------------------------------------------------------------------------

def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_top_k(x: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= x.size:
        return x
    kth = np.sort(x)[::-1][k - 1]
    return np.where(x < kth, -np.inf, x)


def ref_top_p(x: np.ndarray, p: float) -> np.ndarray:
    if p >= 1.0:
        return x
    order = np.argsort(-x, kind="stable")
    probs = softmax(x)[order]
    mass_before = np.cumsum(probs) - probs
    drop = order[mass_before >= p]
    out = x.copy()
    out[drop[drop != order[0]]] = -np.inf
    return out


def ref_min_p(x: np.ndarray, min_p: float) -> np.ndarray:
    probs = softmax(x)
    return np.where(probs < min_p * probs.max(), -np.inf, x)


def ref_history(x: np.ndarray, seq: ScheduledRequest) -> np.ndarray:
    """logit_bias, min_tokens, penalties (steps 1-3) in float64."""
    out = x.astype(np.float64).copy()
    p = seq.sampling_params
    for tok, bias in (p.logit_bias or {}).items():
        out[tok] += bias
    if len(seq.output_token_ids) < p.min_tokens:
        out[list(set(seq.eos_token_ids) | set(p.stop_token_ids))] = -np.inf
    for tok in set(seq.prompt_token_ids) | set(seq.output_token_ids):
        out[tok] = out[tok] / p.repetition_penalty if out[tok] > 0 else out[tok] * p.repetition_penalty
    counts = np.bincount(np.asarray(seq.output_token_ids, dtype=np.int64), minlength=out.size)
    return out - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


def ref_filters(x: np.ndarray, p: SamplingParams) -> np.ndarray:
    """temperature, top-k, top-p, min-p (steps 5-8)."""
    return ref_min_p(ref_top_p(ref_top_k(x / p.temperature, p.top_k), p.top_p), p.min_p)


def py_mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def py_noise(seed: int, position: int, token_id: int) -> float:
    key = py_mix32(position ^ 0x9E3779B9)
    key = py_mix32((seed & 0xFFFFFFFF) ^ key)
    key = py_mix32((seed >> 32) ^ key)
    h = py_mix32(key ^ py_mix32(token_id ^ 0x85EBCA6B))
    return -float(np.log1p(-np.float32((h + 0.5) * 2.0**-32)))


# --- filters ------------------------------------------------------------------------------------

def test_top_k_matches_reference_per_row() -> None:
    logits = random_logits(6)
    top_k = torch.tensor([1, 5, VOCAB, 17, 2, VOCAB])  # VOCAB: top-k off on that row
    result = apply_top_k(logits.clone(), top_k, max_top_k=17)
    expected = np.stack([ref_top_k(logits[i].numpy(), int(k)) for i, k in enumerate(top_k)])
    assert np.array_equal(result.numpy(), expected.astype(np.float32))
    assert (result[1] > float("-inf")).sum().item() == 5


def count_nucleus_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the candidate count of every threshold pass (a second pass is the fallback)."""
    passes: list[int] = []
    original = filters._nucleus_thresholds

    def counting(logits, top_k, top_p, num_candidates):
        passes.append(num_candidates)
        return original(logits, top_k, top_p, num_candidates)

    monkeypatch.setattr(filters, "_nucleus_thresholds", counting)
    return passes


@pytest.mark.parametrize(("num_candidates", "expected_passes"), [
    (None, [VOCAB]),  # the CPU default (1024) exceeds this vocabulary: one full-sort pass
    (4, [40, VOCAB]),  # raised to max_top_k; row 4's nucleus is longer: fallback
    (VOCAB, [VOCAB]),
])
def test_top_k_top_p_match_reference_per_row(
    monkeypatch: pytest.MonkeyPatch, num_candidates: int | None, expected_passes: list[int]
) -> None:
    passes = count_nucleus_passes(monkeypatch)
    logits = random_logits(9, seed=3)
    top_k = [VOCAB, 10, VOCAB, 3, VOCAB, 40, VOCAB, 8, 40]
    top_p = [0.9, 0.5, 0.05, 1.0, 0.999, 0.7, 1.0, 0.3, 1.0]
    result = apply_top_k_top_p(logits.clone(), torch.tensor(top_k), 40, torch.tensor(top_p),
                               num_candidates=num_candidates)
    expected = np.stack([ref_top_p(ref_top_k(logits[i].numpy().astype(np.float64), k), p)
                         for i, (k, p) in enumerate(zip(top_k, top_p))])
    assert np.array_equal(result.numpy(), expected.astype(np.float32))
    assert passes == expected_passes
    kept = (result > float("-inf")).sum(dim=-1)
    assert kept[6].item() == VOCAB and kept[3].item() == 3 and kept[8].item() == 40
    assert 1 <= kept[2].item() < VOCAB


def test_top_k_top_p_found_among_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    passes = count_nucleus_passes(monkeypatch)
    vocab = 512
    logits = random_logits(5, vocab=vocab, seed=14, scale=5.0)  # peaked: short nuclei
    # Row 0's k equals the candidate count, so all its candidates survive top-k.
    top_k = [16, vocab, vocab, 5, vocab]
    top_p = [1.0, 0.5, 1.0, 0.9, 0.8]
    result = apply_top_k_top_p(logits.clone(), torch.tensor(top_k), 16, torch.tensor(top_p),
                               num_candidates=16)
    expected = np.stack([ref_top_p(ref_top_k(logits[i].numpy().astype(np.float64), k), p)
                         for i, (k, p) in enumerate(zip(top_k, top_p))])
    assert passes == [16]
    assert np.array_equal(result.numpy(), expected.astype(np.float32))
    kept = (result > float("-inf")).sum(dim=-1)
    assert kept[0].item() == 16 and kept[2].item() == vocab and kept[1].item() < 16


def test_top_p_without_top_k_matches_reference() -> None:
    logits = random_logits(5, vocab=3000, seed=4, scale=4.0)
    top_p = torch.tensor([0.1, 0.5, 0.8, 0.95, 1.0])
    result = apply_top_k_top_p(logits.clone(), None, 0, top_p, num_candidates=32)  # falls back
    expected = np.stack([ref_top_p(logits[i].numpy().astype(np.float64), float(p)) for i, p in enumerate(top_p)])
    assert np.array_equal(result.numpy(), expected.astype(np.float32))


def test_min_p_matches_reference_per_row() -> None:
    logits = random_logits(4, seed=5)
    min_p = torch.tensor([0.0, 0.05, 0.3, 1.0])
    result = apply_min_p(logits.clone(), min_p)
    expected = np.stack([ref_min_p(logits[i].numpy().astype(np.float64), float(m)) for i, m in enumerate(min_p)])
    assert np.array_equal(result.numpy(), expected.astype(np.float32))
    assert (result[3] > float("-inf")).sum().item() == 1


# --- the whole sampler ----------------------------------------------------------------------------

def mixed_batch() -> list[ScheduledRequest]:
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, repetition_penalty=1.4, logit_bias={7: 3.0}, min_tokens=5),
        SamplingParams(temperature=0.8, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.6, frequency_penalty=0.7),
        SamplingParams(temperature=0.5, min_p=0.2, presence_penalty=1.0, logit_bias={1: -5.0}),
        SamplingParams(temperature=1.0, top_k=12, top_p=0.8, min_p=0.05, repetition_penalty=1.2),
        SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=[9]),
        SamplingParams(temperature=2.0),
    ]
    return [make_seq(p, prompt=(3, 4, 5, 3), output=(6, 7, 6)[: i % 4], seed=100 + i, eos=(2, 8))
            for i, p in enumerate(params)]


def test_sampler_matches_reference_pipeline() -> None:
    seqs = mixed_batch()
    logits = random_logits(len(seqs), seed=6, scale=3.0)
    out = sampler(logits, build_sampling_metadata(seqs, VOCAB, "cpu"))
    for row, seq in enumerate(seqs):
        processed = ref_history(logits[row].numpy(), seq)
        p = seq.sampling_params
        if p.greedy:
            assert out.token_ids[row].item() == int(np.argmax(processed))
            continue
        probs = softmax(ref_filters(processed, p))
        noise = exponential_noise(torch.tensor([seq.seed]), torch.tensor([len(seq.output_token_ids)]), VOCAB)
        assert out.token_ids[row].item() == int(np.argmax(probs / noise[0].double().numpy()))


def test_greedy_batch_is_argmax_and_input_is_untouched() -> None:
    seqs = [make_seq(SamplingParams(temperature=0.0), seed=i) for i in range(5)]
    metadata = build_sampling_metadata(seqs, VOCAB, "cpu")
    assert metadata.all_greedy and metadata.no_logit_transforms and metadata.max_num_logprobs is None
    logits = random_logits(5, seed=7)
    out = sampler(logits, metadata)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1)) and out.logprobs is None
    before = logits.clone()
    sampler(logits, build_sampling_metadata(mixed_batch()[:5], VOCAB, "cpu"))
    assert torch.equal(logits, before)


def test_sampled_tokens_stay_inside_the_filters() -> None:
    logits = random_logits(1, seed=8, scale=3.0).expand(400, VOCAB)
    params = [SamplingParams(temperature=1.5, top_k=4), SamplingParams(temperature=1.5, top_p=0.6),
              SamplingParams(temperature=1.5, min_p=0.1), SamplingParams(temperature=3.0, top_k=9, top_p=0.5)]
    seqs = [make_seq(params[i % 4], seed=i, output=(0,) * (i % 5)) for i in range(400)]
    tokens = sampler(logits, build_sampling_metadata(seqs, VOCAB, "cpu")).token_ids
    for i, p in enumerate(params):
        allowed = np.flatnonzero(ref_filters(logits[0].numpy().astype(np.float64), p) > -np.inf)
        drawn = set(tokens[i::4].tolist())
        assert 1 < len(allowed) < 10  # the filter really cuts, and leaves a choice
        assert drawn == set(allowed.tolist())  # 100 draws reach every allowed token, and nothing else


# --- seeded streams -------------------------------------------------------------------------------

def test_noise_matches_pure_python_hash() -> None:
    seeds = torch.tensor([0, 1234, 2**62 + 12345])
    positions = torch.tensor([0, 7, 123456])
    noise = exponential_noise(seeds, positions, 50)
    for row, (seed, pos) in enumerate(zip(seeds.tolist(), positions.tolist())):
        for tok in (0, 1, 17, 49):
            assert noise[row, tok].item() == pytest.approx(py_noise(seed, pos, tok), rel=1e-6)
    values = torch.tensor([0, 1, 2**31, 2**32 - 1])
    assert mix32(values).tolist() == [py_mix32(v) for v in values.tolist()]


def test_same_seed_gives_same_tokens_alone_or_in_any_batch() -> None:
    target = make_seq(SamplingParams(temperature=1.0, top_p=0.9), seed=42, output=(1, 2, 3))
    others = [make_seq(SamplingParams(temperature=0.9, top_k=20), seed=1000 + i) for i in range(16)]
    logits_target = random_logits(1, seed=9)
    alone = sampler(logits_target, build_sampling_metadata([target], VOCAB, "cpu")).token_ids.item()
    again = sampler(logits_target, build_sampling_metadata([target], VOCAB, "cpu")).token_ids.item()
    assert alone == again
    other_logits = random_logits(16, seed=10)
    for position in (0, 7, 16):
        seqs = others[:position] + [target] + others[position:]
        logits = torch.cat([other_logits[:position], logits_target, other_logits[position:]])
        out = sampler(logits, build_sampling_metadata(seqs, VOCAB, "cpu"))
        assert out.token_ids[position].item() == alone


def test_streams_differ_across_seeds_and_positions() -> None:
    seeds = torch.tensor([5, 6, 5, 5])
    positions = torch.tensor([0, 0, 1, 2])
    noise = exponential_noise(seeds, positions, 4096)
    for a in range(4):
        for b in range(a + 1, 4):
            corr = np.corrcoef(noise[a].numpy(), noise[b].numpy())[0, 1]
            assert abs(corr) < 0.1
            assert not torch.equal(noise[a], noise[b])
    flat = random_logits(1, seed=11, scale=0.0).expand(64, VOCAB)  # uniform distribution
    seqs = [make_seq(SamplingParams(temperature=1.0), seed=i // 8, output=(0,) * (i % 8)) for i in range(64)]
    tokens = sampler(flat, build_sampling_metadata(seqs, VOCAB, "cpu")).token_ids
    assert len(set(tokens.tolist())) > 30  # 64 draws over 64 tokens: no shared stream


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.5, top_k=5, top_p=0.8),
])
def test_empirical_distribution_matches_softmax(params: SamplingParams) -> None:
    logits = torch.tensor([[2.0, 1.2, 0.5, 0.0, -0.3, -1.0, -2.0, -3.0]])
    num_draws = 20000
    seqs = [make_seq(params, seed=i // 4, output=(0,) * (i % 4)) for i in range(num_draws)]
    tokens = sampler(logits.expand(num_draws, 8), build_sampling_metadata(seqs, 8, "cpu")).token_ids
    counts = np.bincount(tokens.numpy(), minlength=8)
    expected_probs = softmax(ref_filters(logits[0].numpy().astype(np.float64), params))
    support = expected_probs > 0
    assert counts[~support].sum() == 0
    expected = expected_probs[support] * num_draws
    chi_square = float((((counts[support] - expected) ** 2) / expected).sum())
    assert chi_square < 24.3  # chi2 quantile 0.999 at 7 degrees of freedom (fewer here is stricter)
    assert 0.5 * np.abs(counts / num_draws - expected_probs).sum() < 0.01


# --- logprobs ------------------------------------------------------------------------------------

def test_logprobs_come_from_raw_logits() -> None:
    seqs = mixed_batch()
    seqs = [dataclasses.replace(s, sampling_params=dataclasses.replace(s.sampling_params, logprobs=k))
            for s, k in zip(seqs, [0, 3, None, 5, 1, 0, 2, 4])]
    logits = random_logits(len(seqs), seed=12, scale=3.0)
    out = sampler(logits, build_sampling_metadata(seqs, VOCAB, "cpu"))
    raw = torch.log_softmax(logits.double(), dim=-1)
    assert out.logprob_token_ids.shape == (len(seqs), 6) and out.logprobs.dtype == torch.float32
    assert torch.equal(out.logprob_token_ids[:, 0], out.token_ids)
    assert torch.allclose(out.logprobs.double(), raw.gather(-1, out.logprob_token_ids), atol=1e-5)
    assert torch.equal(out.logprob_token_ids[:, 1:], raw.topk(5, dim=-1).indices)
    expected_ranks = (raw >= raw.gather(-1, out.token_ids[:, None])).sum(dim=-1)
    assert torch.equal(out.sampled_ranks, expected_ranks)
    greedy_row_ranks = out.sampled_ranks[0].item()
    assert greedy_row_ranks == 1  # plain greedy row: the sampled token is the most likely


def test_prompt_logprobs_helper() -> None:
    logits = random_logits(5, seed=13)
    targets = torch.tensor([3, 0, 63, 10, 10])
    ids, logprobs, ranks = compute_prompt_logprobs(logits, targets, 2)
    raw = torch.log_softmax(logits.double(), dim=-1)
    assert torch.equal(ids[:, 0], targets) and ids.shape == (5, 3)
    assert torch.equal(ids[:, 1:], raw.topk(2, dim=-1).indices)
    assert torch.allclose(logprobs.double(), raw.gather(-1, ids), atol=1e-6)
    assert torch.equal(ranks, (raw >= raw.gather(-1, targets[:, None])).sum(dim=-1))
    only_chosen = compute_prompt_logprobs(logits, targets, 0)
    assert only_chosen[0].shape == (5, 1) and torch.equal(only_chosen[2], ranks)


# --- structured output: the grammar's allowed tokens --------------------------------------------

def bitmask_of(allowed: list[set[int]], vocab: int = VOCAB) -> torch.Tensor:
    """[rows, ceil(vocab / 32)] int32 with bit t of each row set for the allowed tokens."""
    words = np.zeros((len(allowed), (vocab + 31) // 32), dtype=np.uint32)
    for row, tokens in enumerate(allowed):
        for t in tokens:
            words[row, t // 32] |= np.uint32(1 << (t % 32))
    return torch.from_numpy(words.view(np.int32).copy())


def test_allowed_tokens_mask_only_their_rows_and_come_first() -> None:
    from tokenloom.sample.metadata import AllowedTokens

    seqs = mixed_batch()
    seqs = [dataclasses.replace(s, sampling_params=dataclasses.replace(s.sampling_params, logprobs=0))
            for s in seqs]
    logits = random_logits(len(seqs), seed=21, scale=3.0)
    # Row 1: token 7 has a +3 bias, eos 2 is forbidden by min_tokens.
    allowed = [{2, 7, 40}, {1, 40, 63}, {0, 31, 32, VOCAB - 1}]
    rows = torch.tensor([1, 2, 6])
    masked = AllowedTokens(rows, bitmask_of(allowed))
    free = sampler(logits, build_sampling_metadata(seqs, VOCAB, "cpu"))
    out = sampler(logits, build_sampling_metadata(seqs, VOCAB, "cpu", masked))
    for row, tokens in zip(rows.tolist(), allowed):
        assert out.token_ids[row].item() in tokens
    unmasked = [r for r in range(len(seqs)) if r not in rows.tolist()]
    assert torch.equal(out.token_ids[unmasked], free.token_ids[unmasked])  # no leak into other rows
    # Greedy row 1 (bias +3 on token 7, repetition penalty) takes the best allowed token after its transforms.
    processed = ref_history(logits[1].numpy(), seqs[1])
    assert out.token_ids[1].item() == max(allowed[0], key=lambda t: processed[t])
    # Logprobs stay the model's: the raw log-softmax of the sampled (constrained) token.
    raw = torch.log_softmax(logits.double(), dim=-1)
    assert torch.allclose(out.logprobs[:, 0].double(), raw.gather(-1, out.token_ids[:, None])[:, 0], atol=1e-5)


def test_allowed_tokens_for_every_row_and_a_random_row_draws_only_allowed() -> None:
    from tokenloom.sample.metadata import AllowedTokens

    logits = random_logits(1, seed=22, scale=3.0).expand(300, VOCAB)
    seqs = [make_seq(SamplingParams(temperature=1.5), seed=i) for i in range(300)]
    allowed = {3, 4, 50, 51, 63}
    out = sampler(logits, build_sampling_metadata(seqs, VOCAB, "cpu", AllowedTokens(None, bitmask_of([allowed] * 300))))
    assert set(out.token_ids.tolist()) == allowed  # every allowed token drawn, and nothing else
