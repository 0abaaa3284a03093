from __future__ import annotations

import pytest

from tokenloom.kv_cache.block_pool import BlockPool


def test_fresh_pool_hands_out_ids_in_order() -> None:
    pool = BlockPool(6)
    assert pool.num_free_blocks == 6 and pool.num_used_blocks == 0
    assert pool.get_new_blocks(2) == [0, 1]
    assert pool.get_new_blocks(3) == [2, 3, 4]
    assert pool.free_block_ids() == [5]
    assert [pool.ref_count(b) for b in range(6)] == [1, 1, 1, 1, 1, 0]
    assert pool.num_free_blocks == 1 and pool.num_used_blocks == 5
    pool.check_integrity()


def test_freed_blocks_join_the_tail_in_given_order() -> None:
    pool = BlockPool(5)
    pool.get_new_blocks(4)  # [0, 1, 2, 3]; free queue [4]
    pool.free_blocks([2, 0])
    assert pool.free_block_ids() == [4, 2, 0]
    pool.free_blocks([3])
    assert pool.free_block_ids() == [4, 2, 0, 3]
    # Allocation takes the least recently freed first.
    assert pool.get_new_blocks(3) == [4, 2, 0]
    assert pool.free_block_ids() == [3]
    pool.check_integrity()


def test_shared_block_is_free_only_when_last_holder_frees() -> None:
    pool = BlockPool(3)
    assert pool.get_new_blocks(2) == [0, 1]
    pool.incref([0])
    assert pool.ref_count(0) == 2
    pool.free_blocks([1, 0])
    assert pool.ref_count(0) == 1 and pool.ref_count(1) == 0
    assert pool.free_block_ids() == [2, 1]
    pool.free_blocks([0])
    assert pool.free_block_ids() == [2, 1, 0]
    assert pool.num_used_blocks == 0
    pool.check_integrity()


def test_incref_of_free_block_takes_it_out_of_the_middle_of_the_queue() -> None:
    pool = BlockPool(4)
    pool.incref([2])
    assert pool.ref_count(2) == 1
    assert pool.free_block_ids() == [0, 1, 3]
    assert pool.get_new_blocks(3) == [0, 1, 3]
    assert pool.num_free_blocks == 0
    pool.check_integrity()


def test_get_new_blocks_refuses_more_than_free() -> None:
    pool = BlockPool(3)
    pool.get_new_blocks(2)
    with pytest.raises(ValueError, match="asked for 2 blocks but only 1 of 3 are free"):
        pool.get_new_blocks(2)
    assert pool.num_free_blocks == 1
    assert pool.get_new_blocks(0) == []
    with pytest.raises(ValueError, match="negative"):
        pool.get_new_blocks(-1)
    pool.check_integrity()


def test_over_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(4)
    pool.get_new_blocks(2)  # [0, 1]
    with pytest.raises(ValueError, match="block 1 freed 2 time"):
        pool.free_blocks([0, 1, 1])
    assert pool.ref_count(0) == 1 and pool.ref_count(1) == 1
    with pytest.raises(ValueError, match="block 3 freed 1 time"):
        pool.free_blocks([3])
    assert pool.free_block_ids() == [2, 3]
    pool.check_integrity()


@pytest.mark.parametrize("block_id", [-1, 4])
def test_out_of_range_ids_are_rejected(block_id: int) -> None:
    pool = BlockPool(4)
    with pytest.raises(ValueError, match="out of range"):
        pool.ref_count(block_id)
    with pytest.raises(ValueError, match="out of range"):
        pool.incref([block_id])
    with pytest.raises(ValueError, match="out of range"):
        pool.free_blocks([block_id])
    pool.check_integrity()


def test_pool_needs_a_block() -> None:
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        BlockPool(0)


def test_integrity_catches_free_and_referenced_block() -> None:
    pool = BlockPool(3)
    pool._ref_counts[1] = 1
    with pytest.raises(AssertionError, match="block 1 is in the free queue but has ref count 1"):
        pool.check_integrity()


def test_integrity_catches_leaked_block() -> None:
    pool = BlockPool(3)
    pool.get_new_blocks(1)
    pool._ref_counts[0] = 0
    with pytest.raises(AssertionError, match="block 0 has ref count 0 but is not in the free queue"):
        pool.check_integrity()


def test_integrity_catches_negative_ref_count() -> None:
    pool = BlockPool(3)
    pool.get_new_blocks(3)
    pool._ref_counts[2] = -1
    with pytest.raises(AssertionError, match="block 2 has negative ref count -1"):
        pool.check_integrity()


def test_integrity_catches_out_of_range_id_in_free_queue() -> None:
    pool = BlockPool(3)
    pool._free_queue[7] = None
    with pytest.raises(AssertionError, match="out-of-range block id 7"):
        pool.check_integrity()
