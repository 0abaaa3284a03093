"""Prefix caching: the radix tree, the pool's cached-free state, and the scheduler
reusing, evicting and re-finding blocks, with exact block ids."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenloom.kv_cache.block_pool import BlockPool
from tokenloom.kv_cache.prefix_cache import PrefixCache
from tokenloom.request import Request, RequestStatus
from tokenloom.sampling_params import SamplingParams
from tokenloom.sched.output import ModelOutput, SchedulerOutput
from tokenloom.sched.scheduler import Scheduler
from tests.unit.test_scheduler import FakeRunner, chunks, make_scheduler, run_to_completion

SYSTEM = list(range(500, 508))  # two full blocks of 4


def make_req(request_id: str, prompt: list[int], max_tokens: int = 16, **params: object) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, **params), seed=0)


def cached_scheduler(num_blocks: int = 16, budget: int = 32, **options: object) -> Scheduler:
    return make_scheduler(num_blocks=num_blocks, block_size=4, budget=budget,
                          enable_prefix_caching=True, **options)


def evictable(sched: Scheduler) -> list[int]:
    return sched.kv.pool.evictable_block_ids()


# ---- the tree and the pool on their own ------------------------------------------------


def test_insert_match_and_duplicate_content() -> None:
    pool = BlockPool(8)
    cache = PrefixCache(pool, block_size=2)
    b0, b1, b2 = pool.get_new_blocks(3)
    n0 = cache.insert(None, (1, 2), b0)
    n1 = cache.insert(n0, (3, 4), b1)
    assert (n1.parent, n1.depth, cache.num_cached_blocks) == (n0, 2, 2)
    assert cache.insert(n0, (3, 4), b2) is n1  # same content: the cached node, not b2
    assert not pool.is_cached(b2) and pool.is_cached(b1)
    assert [n.block_id for n in cache.match([(1, 2), (3, 4), (5, 6)])] == [0, 1]
    assert cache.match([(1, 3)]) == []
    assert cache.match([(3, 4)]) == []  # the same tokens at another depth are other KV
    with pytest.raises(ValueError, match="holds 2 tokens, got 1"):
        cache.insert(n1, (5,), b2)
    with pytest.raises(ValueError, match="block 3 is not in use"):
        cache.insert(n1, (5, 6), 3)
    cache.check_integrity()


def test_cached_blocks_wait_in_the_evictable_queue_and_revive() -> None:
    pool = BlockPool(4)
    cache = PrefixCache(pool, block_size=1)
    b0, b1 = pool.get_new_blocks(2)
    cache.insert(None, (9,), b0)
    pool.free_blocks([b1, b0])
    assert (pool.free_block_ids(), pool.evictable_block_ids()) == ([2, 3, 1], [0])
    assert (pool.num_free_blocks, pool.num_evictable_blocks, pool.num_used_blocks) == (3, 1, 0)
    pool.incref([0])  # a prefix hit revives it
    assert pool.evictable_block_ids() == [] and pool.ref_count(0) == 1
    pool.free_blocks([0])
    with pytest.raises(ValueError, match="cannot evict 2 blocks: only 1"):
        cache.evict(2)
    assert cache.evict(1) == [0]
    assert pool.free_block_ids() == [2, 3, 1, 0] and not pool.is_cached(0)
    assert cache.match([(9,)]) == []
    cache.check_integrity()
    pool.check_integrity()


def test_eviction_takes_least_recently_released_leaves_first() -> None:
    pool = BlockPool(6)
    cache = PrefixCache(pool, block_size=1)
    a, a1, a2, b = pool.get_new_blocks(4)
    na = cache.insert(None, (1,), a)
    na1 = cache.insert(na, (2,), a1)
    cache.insert(na1, (3,), a2)
    cache.insert(None, (7,), b)
    # Released parent first (no block table does this; it tests the leaves-first rule).
    pool.free_blocks([a, a1, b, a2])
    assert pool.evictable_block_ids() == [0, 1, 3, 2]
    # 0 and 1 are older but have children: 3 (a leaf) goes first, then 2, 1, 0.
    assert cache.evict(1) == [3]
    assert cache.evict(3) == [2, 1, 0]
    assert cache.num_cached_blocks == 0 and pool.free_block_ids() == [4, 5, 3, 2, 1, 0]
    cache.check_integrity()


def test_integrity_catches_tree_and_pool_disagreeing() -> None:
    pool = BlockPool(4)
    cache = PrefixCache(pool, block_size=1)
    b0, b1 = pool.get_new_blocks(2)
    n0 = cache.insert(None, (1,), b0)
    cache.insert(n0, (2,), b1)
    pool.free_blocks([b0])
    with pytest.raises(AssertionError, match="block 1 is in use but its parent 0 is cached-free"):
        cache.check_integrity()
    pool.incref([b0])
    pool._cached.add(3)
    with pytest.raises(AssertionError, match="block 3: pool says cached=True, the tree says False"):
        cache.check_integrity()
    pool._cached.discard(3)
    pool._cached.discard(1)
    with pytest.raises(AssertionError, match="block 1: pool says cached=False, the tree says True"):
        cache.check_integrity()
    pool._cached.add(1)
    cache.check_integrity()
    pool.free_blocks([b1, b0])
    pool._free_queue[1] = pool._evictable.pop(1)
    with pytest.raises(AssertionError, match="block 1 is in the wrong queue"):
        pool.check_integrity()


# ---- the scheduler: reuse ----------------------------------------------------------------


def test_shared_system_prompt_with_diverging_suffixes() -> None:
    sched = cached_scheduler()
    runner = FakeRunner(sched, {"a": [70, 71]})
    a = make_req("a", SYSTEM + [50, 51, 52], max_tokens=2)
    sched.add_request(a)
    out, _ = runner.step()
    assert chunks(out) == [("a", 11)] and out.scheduled[0].block_ids == (0, 1, 2)
    runner.step()  # a's 12th token fills block 2; its second output finishes it
    assert a.is_finished and a.num_cached_tokens == 0
    assert evictable(sched) == [2, 1, 0]  # released tail first
    assert sched.kv.pool.free_block_ids() == list(range(3, 16))

    b = make_req("b", SYSTEM + [60, 61, 62, 63, 64])
    c = make_req("c", SYSTEM + [50, 51, 52, 70, 99])  # also matches a's prompt and output
    sched.add_request(b)
    sched.add_request(c)
    out, _ = runner.step()
    assert chunks(out) == [("b", 5), ("c", 1)]
    assert [(s.num_computed_tokens, s.block_ids) for s in out.scheduled] == [(8, (0, 1, 3, 4)),
                                                                             (12, (0, 1, 2, 5))]
    assert out.scheduled[0].token_ids == (60, 61, 62, 63, 64)
    assert (b.num_cached_tokens, c.num_cached_tokens) == (8, 12)
    assert sched.first_admissions == [b, c]
    assert [sched.kv.pool.ref_count(i) for i in range(6)] == [2, 2, 1, 1, 1, 1]
    assert evictable(sched) == []
    run_to_completion(runner)
    assert sched.kv.num_free_blocks == 16 and sched.kv.pool.num_used_blocks == 0


def test_multi_turn_history_hits_prompt_and_output_blocks() -> None:
    sched = cached_scheduler()
    runner = FakeRunner(sched, {"t1": [70, 71, 72, 73]})
    turn1 = make_req("t1", [1, 2, 3, 4, 5, 6], max_tokens=4)
    sched.add_request(turn1)
    run_to_completion(runner)
    # 6 prompt + 3 fed-back outputs computed: two full blocks, the second half output.
    assert turn1.output_token_ids == [70, 71, 72, 73]
    assert evictable(sched) == [1, 0] and sched.kv.pool.free_block_ids()[-1] == 2

    turn2 = make_req("t2", turn1.all_token_ids + [80, 81, 82])
    sched.add_request(turn2)
    out, _ = runner.step()
    assert chunks(out) == [("t2", 5)]
    assert out.scheduled[0].num_computed_tokens == 8
    assert out.scheduled[0].block_ids == (0, 1, 3, 4)
    assert out.scheduled[0].token_ids == (72, 73, 80, 81, 82)
    assert turn2.num_cached_tokens == 8


def test_prompt_of_exact_full_blocks_recomputes_its_last_block() -> None:
    sched = cached_scheduler()
    runner = FakeRunner(sched)
    sched.add_request(make_req("a", SYSTEM, max_tokens=1))
    run_to_completion(runner)
    assert evictable(sched) == [1, 0]
    b = make_req("b", SYSTEM, max_tokens=2)
    sched.add_request(b)
    out, _ = runner.step()
    # At most 7 of 8 tokens may come from the cache: one block is reused, the last
    # one computed into a fresh block, then swapped for the cached copy.
    assert chunks(out) == [("b", 4)] and out.scheduled[0].block_ids == (0, 2)
    assert b.block_ids == [0, 1] and b.num_cached_tokens == 4
    assert sched.kv.pool.free_block_ids()[-1] == 2 and evictable(sched) == []


def test_same_step_duplicates_keep_one_cached_copy() -> None:
    sched = cached_scheduler()
    runner = FakeRunner(sched)
    a, b = make_req("a", SYSTEM + [1]), make_req("b", SYSTEM + [2])
    sched.add_request(a)
    sched.add_request(b)
    out, _ = runner.step()
    # Both are admitted before either has computed anything: both compute the prefix.
    assert [s.block_ids for s in out.scheduled] == [(0, 1, 2), (3, 4, 5)]
    assert (a.block_ids, b.block_ids) == ([0, 1, 2], [0, 1, 5])
    assert sched.kv.pool.free_block_ids() == list(range(6, 16)) + [3, 4]
    assert [sched.kv.pool.ref_count(i) for i in range(6)] == [2, 2, 1, 0, 0, 1]
    assert b.num_cached_tokens == 0


def test_prompt_logprobs_requests_reuse_only_what_they_collected() -> None:
    sched = cached_scheduler()
    runner = FakeRunner(sched)
    sched.add_request(make_req("a", SYSTEM + [1], max_tokens=1))
    run_to_completion(runner)
    b = make_req("b", SYSTEM + [2], prompt_logprobs=1)
    sched.add_request(b)
    out, _ = runner.step()
    assert chunks(out) == [("b", 9)] and b.num_cached_tokens == 0
    assert out.scheduled[0].prompt_logprobs_start == 0
    assert b.num_prompt_logprobs_done == 9


# ---- the scheduler: eviction, aborts, preemption --------------------------------------------


def test_eviction_only_under_pressure_in_lru_order() -> None:
    sched = cached_scheduler(num_blocks=6)
    runner = FakeRunner(sched)
    for rid, base in (("x", 100), ("y", 200)):
        sched.add_request(make_req(rid, list(range(base, base + 8)), max_tokens=1))
        run_to_completion(runner)
    assert evictable(sched) == [1, 0, 3, 2] and sched.kv.pool.free_block_ids() == [4, 5]
    z = make_req("z", list(range(300, 312)), max_tokens=1)
    sched.add_request(z)
    out, _ = runner.step()
    # Two free blocks, then one eviction: x's tail (released first, a leaf).
    assert out.scheduled[0].block_ids == (4, 5, 1)
    assert evictable(sched) == [0, 3, 2, 1, 5, 4]
    assert sched.kv.prefix_cache.match([tuple(range(100, 104)), tuple(range(104, 108))])[0].block_id == 0
    assert len(sched.kv.prefix_cache.match([tuple(range(100, 104)), tuple(range(104, 108))])) == 1
    w = make_req("w", list(range(200, 207)) + [9])  # y's first block, then differs
    sched.add_request(w)
    out, _ = runner.step()
    assert w.num_cached_tokens == 4
    assert out.scheduled[0].block_ids == (2, 0)  # x's head is now the oldest leaf
    assert evictable(sched) == [3, 1, 5, 4]


def test_abort_of_a_request_holding_shared_blocks() -> None:
    sched = cached_scheduler()
    runner = FakeRunner(sched)
    a = make_req("a", SYSTEM + [1, 2, 3])
    sched.add_request(a)
    runner.step()
    b = make_req("b", SYSTEM + [4, 5])
    sched.add_request(b)
    out, _ = runner.step()
    assert (a.block_ids, b.block_ids) == ([0, 1, 2], [0, 1, 3])
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    # Shared blocks stay with b; a's third block (12 tokens computed: full) is cached-free.
    assert [sched.kv.pool.ref_count(i) for i in range(4)] == [1, 1, 0, 1]
    assert evictable(sched) == [2]
    sched.check_integrity()
    sched.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    assert evictable(sched) == [2, 1, 0]  # b's partial block 3 was not cached
    assert sched.kv.pool.free_block_ids()[-1] == 3
    sched.check_integrity()


def test_preempted_request_finds_its_surviving_blocks() -> None:
    sched = cached_scheduler(num_blocks=4, budget=16)
    runner = FakeRunner(sched, {"a": [11, 12, 13, 14], "b": [21, 22, 23]})
    a = make_req("a", list(range(100, 107)), max_tokens=4)
    b = make_req("b", list(range(200, 207)), max_tokens=3)
    sched.add_request(a)
    sched.add_request(b)
    runner.step()
    runner.step()  # 8 tokens computed each: all four blocks cached and in use
    out, _ = runner.step()  # a needs a block: b is preempted, then b's tail evicted
    assert out.preempted_ids == ("b",) and out.scheduled[0].block_ids == (0, 1, 3)
    assert evictable(sched) == [2]
    out, _ = runner.step()  # b finds block 2 but needs two more: it waits; a finishes
    assert chunks(out) == [("a", 1)] and a.is_finished
    assert evictable(sched) == [2, 1, 0] and sched.kv.pool.free_block_ids() == [3]
    out, _ = runner.step()
    assert chunks(out) == [("b", 5)]
    s = out.scheduled[0]
    assert (s.num_computed_tokens, s.block_ids) == (4, (2, 3, 1))
    assert s.token_ids == (204, 205, 206, 21, 22)
    assert b.is_finished and b.output_token_ids == [21, 22, 23]
    assert b.num_cached_tokens == 0  # its own blocks found again are not a cache hit
    assert b.num_preemptions == 1


def test_samples_still_share_through_their_sibling_with_caching_on() -> None:
    sched = cached_scheduler()
    runner = FakeRunner(sched)
    params = dict(n=2, max_tokens=3)
    s0 = Request("p-0", SYSTEM + [1], SamplingParams(**params), parent_id="p", sample_index=0, seed=0)
    s1 = Request("p-1", SYSTEM + [1], SamplingParams(**params), parent_id="p", sample_index=1, seed=1)
    sched.add_request(s0)
    sched.add_request(s1)
    out, _ = runner.step()
    assert chunks(out) == [("p-0", 9)]
    out, _ = runner.step()
    assert chunks(out) == [("p-0", 1), ("p-1", 1)]
    assert (s0.block_ids, s1.block_ids) == ([0, 1, 2], [0, 1, 3])
    assert (s0.num_cached_tokens, s1.num_cached_tokens) == (0, 8)
    run_to_completion(runner)


# ---- random workloads ------------------------------------------------------------------

FAMILIES = [list(range(base, base + 24)) for base in (1000, 2000, 3000)]

add_op = st.tuples(st.just("add"), st.integers(0, 2), st.integers(0, 24), st.integers(0, 6),
                   st.integers(1, 6), st.integers(1, 2), st.booleans())
ops = st.lists(
    st.one_of(add_op, add_op, st.tuples(st.just("turn"), st.integers(0, 40), st.integers(1, 4)),
              st.tuples(st.just("step")), st.tuples(st.just("step")),
              st.tuples(st.just("abort"), st.integers(0, 40)), st.tuples(st.just("evict"), st.integers(1, 8))),
    min_size=4, max_size=60,
)


class ContentRunner(FakeRunner):
    """A FakeRunner with a fake KV cache: each slot holds the token written there.
    Before a step, every position a sequence attends to must hold its own token
    (so a shared or reused block really holds that prefix), and a step writes
    only into blocks its sequence holds alone."""

    def __init__(self, sched: Scheduler, script: dict[str, list[int]]) -> None:
        super().__init__(sched, script)
        self.slots: dict[int, int] = {}

    def execute(self, out: SchedulerOutput) -> ModelOutput:
        bs = self.sched.kv.block_size
        for s in out.scheduled:
            tokens = self.sched.get_request(s.request_id).all_token_ids
            for p in range(s.num_computed_tokens):
                assert self.slots.get(s.block_ids[p // bs] * bs + p % bs) == tokens[p], (s.request_id, p)
        for s in out.scheduled:
            for p, token in enumerate(s.token_ids, start=s.num_computed_tokens):
                block_id = s.block_ids[p // bs]
                assert self.sched.kv.pool.ref_count(block_id) == 1, (s.request_id, block_id)
                self.slots[block_id * bs + p % bs] = token
        return super().execute(out)


def assert_full_blocks_cached(sched: Scheduler) -> None:
    kv = sched.kv
    for req in [*sched.running, *sched.waiting]:
        num_full = req.num_computed_tokens // kv.block_size
        chunks_ = [tuple(req.all_token_ids[i * kv.block_size:(i + 1) * kv.block_size]) for i in range(num_full)]
        assert [n.block_id for n in kv.prefix_cache.match(chunks_)] == req.block_ids[:num_full]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, block_size=st.sampled_from([1, 2, 4]), budget=st.integers(1, 24),
       max_num_seqs=st.integers(1, 6))
def test_random_shared_prefix_workloads_keep_integrity(ops: list[tuple], block_size: int, budget: int,
                                                       max_num_seqs: int) -> None:
    num_blocks = 24 // block_size  # one max_model_len request fills the cache: pressure
    sched = make_scheduler(num_blocks=num_blocks, block_size=block_size, budget=budget,
                           max_num_seqs=max_num_seqs, max_model_len=24, enable_prefix_caching=True)
    runner = ContentRunner(sched, {})
    added: list[Request] = []

    def add(parent: str, prompt: list[int], n: int, max_tokens: int, logprobs: bool) -> None:
        params = SamplingParams(n=n, max_tokens=max_tokens, prompt_logprobs=0 if logprobs else None)
        for i in range(n):
            req = Request(f"{parent}-{i}", prompt, params, eos_token_ids=(3,), parent_id=parent,
                          sample_index=i, seed=i)
            runner.script[req.request_id] = [(len(added) + j + i) % 5 for j in range(8)]
            sched.add_request(req)
            added.append(req)

    for op in ops:
        if op[0] == "add":
            _, family, prefix_len, suffix_len, max_tokens, n, logprobs = op
            suffix = [5000 + 10 * len(added) + i for i in range(suffix_len)]
            prompt = (FAMILIES[family][:prefix_len] + suffix)[:24] or [4]
            add(f"r{len(added)}", prompt, n, max_tokens, logprobs)
        elif op[0] == "turn" and added:
            history = added[op[1] % len(added)].all_token_ids
            prompt = (history + [6000 + len(added)])[:24]
            add(f"r{len(added)}", prompt, 1, op[2], False)
        elif op[0] == "step":
            runner.step()
        elif op[0] == "abort" and added:
            sched.finish_requests([added[op[1] % len(added)].request_id], RequestStatus.FINISHED_ABORTED)
        elif op[0] == "evict":
            sched.kv.prefix_cache.evict(min(op[1], sched.kv.pool.num_evictable_blocks))
        sched.check_integrity()
        assert_full_blocks_cached(sched)
    run_to_completion(runner, max_steps=3000)
    assert all(req.is_finished and req.block_ids == [] for req in added)
    assert sched.kv.num_free_blocks == num_blocks and sched.kv.pool.num_used_blocks == 0
    assert sched.kv.pool.num_evictable_blocks == sched.kv.prefix_cache.num_cached_blocks
    for req in added:
        assert 0 <= req.num_cached_tokens < req.num_prompt_tokens
        if req.status is not RequestStatus.FINISHED_ABORTED and req.sampling_params.prompt_logprobs is not None:
            assert len(req.prompt_logprobs) == req.num_prompt_tokens
    sched.check_integrity()
