"""Speculative decoding's pure parts: the config, the n-gram proposer, the acceptance
rule, rejection sampling and the drafter's caps and policy."""

from __future__ import annotations

import random

import pytest
import torch

from tokenloom.config import SpeculativeConfig, parse_speculative_config
from tokenloom.request import Request, RequestStatus
from tokenloom.sample.noise import exponential_noise, uniform_noise
from tokenloom.sampling_params import SamplingParams
from tokenloom.spec_decode.drafter import Drafter, worthwhile_drafts
from tokenloom.spec_decode.ngram import NgramProposer
from tokenloom.spec_decode.rejection import rejection_sample
from tokenloom.spec_decode.verify import num_accepted

# ---- config -------------------------------------------------------------------


def test_config_takes_vllms_json() -> None:
    config = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 5, '
                                      '"prompt_lookup_max": 4, "prompt_lookup_min": 3}')
    assert (config.method, config.num_speculative_tokens, config.prompt_lookup_min,
            config.prompt_lookup_max) == ("ngram", 5, 3, 4)
    draft = parse_speculative_config({"model": "some.gguf", "num_speculative_tokens": 3})
    assert draft.method == "draft_model" and draft.model == "some.gguf"
    assert parse_speculative_config(None) is None


@pytest.mark.parametrize("spec, message", [
    ('{"method": "eagle", "num_speculative_tokens": 3}', "method must be one of"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', r"num_speculative_tokens must be an integer in \[1, 16\]"),
    ('{"method": "ngram", "num_speculative_tokens": 17}', "num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": 2.5}', "num_speculative_tokens"),
    ('{"method": "ngram"}', "'num_speculative_tokens' is required"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 5, "prompt_lookup_max": 2}',
     "prompt_lookup_min <= prompt_lookup_max"),
    ('{"method": "draft_model", "num_speculative_tokens": 3}', "needs 'model'"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "draft_tensor_parallel_size": 1}', "unknown key"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 0}', "disable_by_batch_size"),
    ("[1, 2]", "must be a JSON object"),
    ("{method: ngram}", "not valid JSON"),
])
def test_bad_configs_are_clear_errors(spec, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse_speculative_config(spec)


# ---- n-gram proposer ------------------------------------------------------------


def test_ngram_proposes_what_followed_the_longest_recent_match() -> None:
    proposer = NgramProposer(prompt_lookup_min=1, prompt_lookup_max=3)
    #        0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [5, 6, 7, 8, 9, 1, 6, 7, 3, 4, 6, 7]
    # suffix (6, 7): found at 1 and 6; the most recent (6) is followed by 3, 4, 6, 7.
    assert proposer.propose(tokens, 3) == [3, 4, 6]
    assert proposer.propose(tokens, 10) == [3, 4, 6, 7]  # a match near the end gives fewer
    # A 3-gram match wins over more recent shorter ones.
    assert proposer.propose([1, 2, 3, 9, 9, 2, 3, 7, 1, 2, 3], 2) == [9, 9]


def test_ngram_needs_at_least_min_tokens_of_match() -> None:
    proposer = NgramProposer(prompt_lookup_min=2, prompt_lookup_max=4)
    assert proposer.propose([1, 2, 3, 4, 5, 3], 3) == []  # only a 1-token match
    assert proposer.propose([1, 2, 3, 4, 5, 2, 3], 3) == [4, 5, 2]
    assert proposer.propose([4], 3) == [] and proposer.propose([1, 2, 1, 2], 0) == []
    with pytest.raises(ValueError):
        NgramProposer(3, 2)


def _lookup_by_hand(tokens: list[int], k: int, low: int, high: int) -> list[int]:
    for n in range(min(high, len(tokens) - 1), low - 1, -1):
        starts = [s for s in range(len(tokens) - n) if tokens[s:s + n] == tokens[len(tokens) - n:]]
        if starts:
            return tokens[starts[-1] + n:starts[-1] + n + k]
    return []


def test_ngram_equals_a_search_by_hand_on_random_sequences() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        tokens = [rng.randrange(rng.choice([2, 3, 5, 20])) for _ in range(rng.randint(1, 40))]
        low = rng.randint(1, 4)
        high, k = rng.randint(low, 6), rng.randint(1, 6)
        assert NgramProposer(low, high).propose(tokens, k) == _lookup_by_hand(tokens, k, low, high), tokens


def test_num_accepted_stops_at_the_first_disagreement() -> None:
    assert num_accepted([5, 6, 7, 8], [5, 6, 9]) == 2
    assert num_accepted([5, 6, 9, 8], [5, 6, 9]) == 3
    assert num_accepted([4], []) == 0 and num_accepted([4, 1], [3]) == 0


# ---- rejection sampling ------------------------------------------------------------


def test_rejection_sampling_keeps_the_target_distribution() -> None:
    """Drafts drawn from q, verified against p: the tokens come out distributed as p."""
    vocab, rows = 6, 200_000
    p = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])
    q = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.1, 0.1])
    seeds = torch.arange(rows, dtype=torch.int64)
    positions = torch.full((rows,), 7, dtype=torch.int64)
    draft_noise = exponential_noise(seeds + 10**9, positions, vocab)  # the draft's own stream
    drafts = (q / draft_noise).argmax(dim=-1)
    assert torch.allclose(torch.bincount(drafts, minlength=vocab) / rows, q, atol=4e-3)
    tokens = rejection_sample(p.expand(rows, -1), q.expand(rows, -1), drafts, uniform_noise(seeds, positions),
                              exponential_noise(seeds, positions, vocab))
    assert torch.allclose(torch.bincount(tokens, minlength=vocab) / rows, p, atol=4e-3)
    # The acceptance rate is sum(min(p, q)).
    accepted = (tokens == drafts).float().mean()
    assert abs(accepted - torch.minimum(p, q).sum()) < 5e-3


def test_rejection_takes_the_draft_where_p_covers_it_and_never_on_rejection() -> None:
    p = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.8, 0.0], [0.5, 0.5, 0.0]])
    q = torch.tensor([[0.0, 0.2, 0.8], [0.2, 0.8, 0.0], [0.0, 0.0, 1.0]])
    drafts = torch.tensor([1, 1, 2])  # p >= q: always kept; p == q: kept; p = 0: always rejected
    for seed in range(50):
        seeds = torch.full((3,), seed, dtype=torch.int64)
        positions = torch.zeros(3, dtype=torch.int64)
        tokens = rejection_sample(p, q, drafts, uniform_noise(seeds, positions), exponential_noise(seeds, positions, 3))
        assert tokens[0] == 1 and tokens[1] == 1
        assert tokens[2] in (0, 1)


# ---- drafter ---------------------------------------------------------------------


def decoding_request(request_id: str, prompt: list[int], output: list[int], **params) -> Request:
    req = Request(request_id, prompt, SamplingParams(**params))
    req.output_token_ids = list(output)
    req.num_computed_tokens = req.num_tokens - 1
    req.status = RequestStatus.RUNNING
    return req


def test_worthwhile_drafts_follow_the_acceptance_record() -> None:
    assert worthwhile_drafts(0, 0) == 4  # the prior: 3/4 of drafts accepted
    assert worthwhile_drafts(40, 40) == 16  # all accepted: as many as configured
    assert worthwhile_drafts(40, 36) == 9  # 39/44 = 0.886: 0.886**9 = 0.34, 0.886**10 = 0.299
    assert worthwhile_drafts(40, 28) == 3  # 31/44 = 0.70: 0.70**3 = 0.35
    assert worthwhile_drafts(40, 20) == 1  # 23/44 = 0.52: 0.52**2 = 0.27
    assert worthwhile_drafts(40, 4) == 1  # never none: the rate must go on being measured


def test_drafter_caps_drafts_by_max_tokens_and_max_model_len() -> None:
    drafter = Drafter(SpeculativeConfig("ngram", 5, prompt_lookup_max=2, prompt_lookup_min=1), max_model_len=20)
    text = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    roomy = decoding_request("a", text, [3], max_tokens=100)
    roomy.num_draft_tokens = roomy.num_accepted_tokens = 10  # a record that earns all 5
    short = decoding_request("b", text, [3], max_tokens=4)  # 1 out, 4 allowed: 3 more = 2 drafts + 1
    long = decoding_request("c", text + [9] * 6, [3], max_tokens=100)  # 17 of 20 tokens: 2 drafts
    prefill = decoding_request("d", text, [3])
    prefill.num_computed_tokens = 4  # still in its prompt: no drafts
    drafter.propose([roomy, short, long, prefill])
    assert roomy.spec_token_ids == [4, 5, 6, 7, 8]
    assert short.spec_token_ids == [4, 5]
    assert long.spec_token_ids == [4, 5]  # (9, 3) never occurred; the 1-gram 3 did, before 4, 5
    assert prefill.spec_token_ids == []


def test_drafter_speculates_for_nobody_in_a_large_batch() -> None:
    drafter = Drafter(SpeculativeConfig("ngram", 3, prompt_lookup_min=1, disable_by_batch_size=2), 100)
    requests = [decoding_request(str(i), [1, 2, 3, 1], [2]) for i in range(3)]
    requests[0].spec_token_ids = [9]
    drafter.propose(requests)
    assert all(r.spec_token_ids == [] for r in requests)
    drafter.propose(requests[:2])
    assert [r.spec_token_ids for r in requests[:2]] == [[3, 1, 2]] * 2


class PrefixGrammar:
    """A grammar that accepts only tokens below ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def num_valid(self, token_ids: list[int]) -> int:
        return next((i for i, t in enumerate(token_ids) if t >= self.limit), len(token_ids))


def test_drafter_keeps_the_drafts_a_grammar_allows() -> None:
    drafter = Drafter(SpeculativeConfig("ngram", 4, prompt_lookup_min=1), 100)
    req = decoding_request("a", [1, 2, 3, 9, 4, 1], [2])
    req.grammar = PrefixGrammar(5)
    drafter.propose([req])
    assert req.spec_token_ids == [3]  # 9 is refused, so nothing after it can stand
