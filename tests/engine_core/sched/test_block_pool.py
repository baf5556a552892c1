"""BlockPool: free queue order, reference counts, the hash map and chained block hashes."""

import hashlib

import pytest

from engine_core.sched.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock, hash_block_tokens


def test_free_queue_removes_from_the_middle_and_keeps_order():
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    assert [b.block_id for b in queue] == [0, 1, 3, 4]
    queue.append(blocks[2])
    assert [b.block_id for b in queue] == [0, 1, 3, 4, 2]
    assert queue.popleft() is blocks[0]
    assert len(queue) == 4
    with pytest.raises(AssertionError, match="block 0 is not free"):
        queue.remove(blocks[0])


def test_free_queue_pop_from_empty_raises():
    queue = FreeBlockQueue([])
    with pytest.raises(AssertionError, match="no free KV cache block"):
        queue.popleft()


def test_null_block_is_never_handed_out():
    pool = BlockPool(4)
    assert pool.num_usable_blocks == 3
    assert pool.num_free_blocks == 3
    ids = [b.block_id for b in pool.get_new_blocks(3)]
    assert sorted(ids) == [1, 2, 3]
    with pytest.raises(AssertionError, match="only 0 free"):
        pool.get_new_blocks(1)


def test_too_few_blocks_is_rejected():
    with pytest.raises(AssertionError, match="1 blocks are too few"):
        BlockPool(1)


def test_ref_counts_with_touch_and_free():
    pool = BlockPool(4)
    (block,) = pool.get_new_blocks(1)
    assert block.ref_cnt == 1
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free_blocks([block])
    assert block.ref_cnt == 1 and pool.num_free_blocks == 2
    pool.free_blocks([block])
    assert block.ref_cnt == 0 and pool.num_free_blocks == 3
    with pytest.raises(AssertionError, match="freed more often than held"):
        pool.free_blocks([block])
    # Touching an unheld (cached) block takes it back out of the free queue.
    pool.touch([block])
    assert pool.num_free_blocks == 2 and block not in list(pool.free_queue)


def test_eviction_follows_free_order_and_drops_the_hash():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(5)
    hashes = [hash_block_tokens(None, [i]) for i in range(5)]
    pool.cache_full_blocks(blocks, hashes, 0, 5)
    # Freed in the order given: that is the eviction order.
    pool.free_blocks([blocks[4], blocks[3], blocks[0], blocks[1], blocks[2]])
    assert all(pool.get_cached_block(h) is not None for h in hashes)
    evicted = pool.get_new_blocks(2)
    assert evicted == [blocks[4], blocks[3]]
    assert pool.get_cached_block(hashes[4]) is None and pool.get_cached_block(hashes[3]) is None
    assert all(b.block_hash is None for b in evicted)
    assert pool.get_cached_block(hashes[0]) is blocks[0]


def test_duplicate_hash_keeps_the_first_block():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    h = hash_block_tokens(None, [1, 2])
    pool.cache_full_blocks([a], [h], 0, 1)
    pool.cache_full_blocks([b], [h], 0, 1)
    assert pool.get_cached_block(h) is a
    assert b.block_hash is None


def test_caching_disabled_caches_nothing():
    pool = BlockPool(4, enable_caching=False)
    blocks = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [1])
    pool.cache_full_blocks(blocks, [h], 0, 1)
    assert pool.get_cached_block(h) is None


def test_reset_prefix_cache_refused_while_blocks_are_held():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(2)
    hashes = [hash_block_tokens(None, [1]), hash_block_tokens(None, [2])]
    pool.cache_full_blocks(blocks, hashes, 0, 2)
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(hashes[0]) is blocks[0]
    pool.free_blocks(blocks)
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(hashes[0]) is None and blocks[0].block_hash is None


def test_usage_counts_held_blocks():
    pool = BlockPool(5)
    assert pool.usage == 0.0
    held = pool.get_new_blocks(2)
    assert pool.usage == pytest.approx(0.5)
    pool.free_blocks(held)
    assert pool.usage == 0.0


def test_block_hash_chains_the_parent():
    root_a = hash_block_tokens(None, [1, 2, 3, 4])
    root_b = hash_block_tokens(None, [1, 2, 3, 5])
    assert root_a != root_b
    assert hash_block_tokens(None, [1, 2, 3, 4]) == root_a  # deterministic
    child_a = hash_block_tokens(root_a, [9, 9, 9, 9])
    child_b = hash_block_tokens(root_b, [9, 9, 9, 9])
    assert child_a != child_b  # same tokens, different parent
    assert hash_block_tokens(root_a, [9, 9, 9, 9], extra_keys=("lora", 1)) != child_a
    assert len(child_a) == hashlib.sha256().digest_size
