from __future__ import annotations

import pytest

from tokenloom.kv_cache.manager import KVCacheManager
from tokenloom.request import Request
from tokenloom.sampling_params import SamplingParams


def make_request(request_id: str, prompt_len: int, num_output: int = 0) -> Request:
    req = Request(request_id, list(range(100, 100 + prompt_len)), SamplingParams(), seed=0)
    req.output_token_ids.extend(range(num_output))
    return req


def test_allocate_slots_rounds_up_to_blocks_and_grows_incrementally() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    req = make_request("a", 10)
    assert kv.allocate_slots(req, 5)  # tokens 0..4 -> 2 blocks
    assert req.block_ids == [0, 1]
    req.num_computed_tokens = 5
    assert kv.allocate_slots(req, 3)  # tokens 0..7 still fit in 2 blocks
    assert req.block_ids == [0, 1]
    req.num_computed_tokens = 8
    assert kv.allocate_slots(req, 2)  # token 8, 9 -> third block
    assert req.block_ids == [0, 1, 2]
    assert kv.allocate_slots(req, 0)
    assert kv.num_free_blocks == 5
    assert kv.usage == pytest.approx(3 / 8)
    assert kv.capacity_tokens == 32
    kv.check_integrity([req])


def test_allocate_slots_is_all_or_nothing() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a, b = make_request("a", 12), make_request("b", 8)
    assert kv.allocate_slots(a, 12)
    assert a.block_ids == [0, 1, 2]
    assert not kv.allocate_slots(b, 8)  # needs 2 blocks, 1 free
    assert b.block_ids == [] and kv.num_free_blocks == 1
    assert kv.allocate_slots(b, 4)
    assert b.block_ids == [3]
    assert kv.usage == 1.0
    kv.check_integrity([a, b])


def test_free_releases_tail_first() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=2)
    a, b = make_request("a", 6), make_request("b", 4)
    kv.allocate_slots(a, 6)
    kv.allocate_slots(b, 4)
    assert (a.block_ids, b.block_ids) == ([0, 1, 2], [3, 4])
    kv.free(a)
    assert a.block_ids == []
    assert kv.pool.free_block_ids() == [5, 2, 1, 0]
    kv.free(b)
    assert kv.pool.free_block_ids() == [5, 2, 1, 0, 4, 3]
    assert kv.usage == 0.0
    kv.check_integrity([a, b])


def test_share_prefix_takes_full_blocks_by_ref_count() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    src, dst = make_request("s0", 11), make_request("s1", 11)
    kv.allocate_slots(src, 11)
    src.num_computed_tokens = 11
    assert src.block_ids == [0, 1, 2]
    # 10 tokens -> 2 full blocks; the partial third block stays private.
    assert kv.share_prefix(src, dst, 10) == 8
    assert dst.block_ids == [0, 1]
    assert dst.num_computed_tokens == 8
    assert [kv.pool.ref_count(b) for b in (0, 1, 2)] == [2, 2, 1]
    kv.check_integrity([src, dst])
    assert kv.allocate_slots(dst, 3)
    assert dst.block_ids == [0, 1, 3]
    kv.free(src)
    assert kv.pool.free_block_ids() == [4, 5, 6, 7, 2]
    assert [kv.pool.ref_count(b) for b in (0, 1)] == [1, 1]
    kv.check_integrity([dst])
    kv.free(dst)
    assert kv.num_free_blocks == 8
    kv.check_integrity([])


def test_share_prefix_below_one_block_shares_nothing() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    src, dst = make_request("s0", 3), make_request("s1", 3)
    kv.allocate_slots(src, 3)
    src.num_computed_tokens = 3
    assert kv.share_prefix(src, dst, 2) == 0
    assert dst.block_ids == [] and dst.num_computed_tokens == 0
    kv.check_integrity([src, dst])


def test_share_prefix_rejects_bad_use() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    src, dst = make_request("s0", 9), make_request("s1", 9)
    kv.allocate_slots(src, 9)
    src.num_computed_tokens = 4
    with pytest.raises(ValueError, match="only 4 are computed"):
        kv.share_prefix(src, dst, 8)
    kv.allocate_slots(dst, 1)
    with pytest.raises(ValueError, match="already holds blocks"):
        kv.share_prefix(src, dst, 4)
    assert [kv.pool.ref_count(b) for b in range(4)] == [1, 1, 1, 1]
    kv.check_integrity([src, dst])


def test_check_integrity_catches_ref_count_mismatch() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request("a", 8)
    kv.allocate_slots(a, 8)
    with pytest.raises(AssertionError, match="block 0 has ref count 1 but 0 request"):
        kv.check_integrity([])
    b = make_request("b", 4)
    b.block_ids = [1]  # a table the manager never handed out
    with pytest.raises(AssertionError, match="block 1 has ref count 1 but 2 request"):
        kv.check_integrity([a, b])


def test_check_integrity_catches_table_size_out_of_bounds() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request("a", 6)
    kv.allocate_slots(a, 4)
    a.num_computed_tokens = 5  # computed past its blocks
    with pytest.raises(AssertionError, match=r"a holds 1 blocks; expected between 2 \(computed 5"):
        kv.check_integrity([a])
    b = make_request("b", 4)
    kv.allocate_slots(b, 8)  # runs ahead of its 4 known tokens
    with pytest.raises(AssertionError, match=r"b holds 2 blocks; expected between 0 .* and 1"):
        kv.check_integrity([b])


def test_check_integrity_catches_block_held_twice() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request("a", 8)
    kv.allocate_slots(a, 4)
    kv.pool.incref([0])
    a.block_ids.append(0)
    with pytest.raises(AssertionError, match=r"a holds a block twice: \[0, 0\]"):
        kv.check_integrity([a])


def test_manager_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(num_blocks=4, block_size=0)
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheManager(num_blocks=0, block_size=4)
    kv = KVCacheManager(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="num_new_tokens"):
        kv.allocate_slots(make_request("a", 1), -1)


def req_of(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, prompt, SamplingParams(), seed=0)


# ---- prefix caching (the tree itself: test_prefix_cache.py) ----------------------------


def test_manager_with_caching_off_caches_nothing() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = req_of("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    kv.cache_full_blocks(a)
    assert kv.prefix_cache is None
    kv.free(a)
    b = req_of("b", [1, 2, 3, 4, 5])
    assert kv.allocate_cached_prefix(b, 4) == 0 and b.block_ids == []
    assert kv.pool.free_block_ids() == [3, 2, 1, 0] and kv.pool.evictable_block_ids() == []


def test_manager_rejects_bad_prefix_requests() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = req_of("a", [1, 2, 3])
    with pytest.raises(ValueError, match="cannot reuse 4 tokens of request a: it has only 3"):
        kv.allocate_cached_prefix(a, 4)
    kv.allocate_slots(a, 1)
    with pytest.raises(ValueError, match="already holds blocks"):
        kv.allocate_cached_prefix(a, 2)


def test_manager_integrity_catches_a_table_off_its_cached_path() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=2)
    a, b = req_of("a", [1, 2, 3, 4]), req_of("b", [1, 2, 3, 4])
    kv.allocate_slots(a, 4)
    a.num_computed_tokens = 4
    kv.cache_full_blocks(a)
    assert kv.allocate_cached_prefix(b, 3) == 2 and b.block_ids == [0]
    kv.pool.incref([1])
    b.block_ids.insert(0, 1)  # cached block 1 (depth 2) at index 0
    with pytest.raises(AssertionError, match="b holds cached block 1 at index 0, off its path"):
        kv.check_integrity([a, b])
    kv.pool.free_blocks([b.block_ids.pop(0)])
    kv.check_integrity([a, b])
    kv.free(a)
    kv.check_integrity([b])
    kv.pool.free_blocks(b.block_ids)  # released behind the manager's back
    b.block_ids = []
    with pytest.raises(AssertionError, match=r"cache cursors left for released requests \['b'\]"):
        kv.check_integrity([])
