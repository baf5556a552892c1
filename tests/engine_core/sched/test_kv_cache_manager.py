"""KVCacheManager: prefix hits across requests, shared blocks, allocation and freeing order."""

import pytest

from engine_core.protocol import SamplingParams
from engine_core.sched.block_pool import hash_block_tokens
from engine_core.sched.kv_cache_manager import KVCacheManager
from engine_core.sched.request import Request

BS = 4


def make_request(req_id: str, tokens: list[int]) -> Request:
    return Request(req_id, tokens, SamplingParams(), [0], 0.0, BS)


def admit(kv: KVCacheManager, request: Request) -> int:
    """Look up the prefix, allocate the whole rest and mark it computed, as a scheduler would."""
    blocks, num_hit = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, request.num_tokens - num_hit, blocks) is not None
    request.num_computed_tokens = request.num_tokens
    return num_hit


def test_request_hashes_blocks_incrementally():
    request = make_request("a", list(range(1, 7)))  # one full block, two tokens over
    assert len(request.block_hashes) == 1
    request.append_output_token(7)
    assert len(request.block_hashes) == 1
    request.append_output_token(8)
    assert len(request.block_hashes) == 2
    fresh = make_request("b", list(range(1, 9)))
    assert request.block_hashes == fresh.block_hashes
    assert request.block_hashes[1] == hash_block_tokens(request.block_hashes[0], [5, 6, 7, 8])


def test_every_block_back_in_the_pool_after_all_requests_end():
    kv = KVCacheManager(num_blocks=12, block_size=BS)
    requests = [make_request(str(i), list(range(i, i + 10))) for i in range(3)]
    for r in requests:
        admit(kv, r)
    assert kv.block_pool.num_free_blocks == 11 - 9
    for r in requests:
        kv.free(r)
    assert kv.block_pool.num_free_blocks == kv.block_pool.num_usable_blocks == 11
    assert kv.req_to_blocks == {}


def test_prefix_hit_across_requests_shares_blocks_with_ref_counts():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prompt = list(range(1, 11))  # 2 full blocks + 2 tokens
    a = make_request("a", prompt)
    assert admit(kv, a) == 0
    b = make_request("b", prompt + [99])
    assert admit(kv, b) == 8
    a_ids, b_ids = kv.get_block_ids("a"), kv.get_block_ids("b")
    assert b_ids[:2] == a_ids[:2] and b_ids[2] != a_ids[2]
    shared = kv.req_to_blocks["a"][:2]
    assert [blk.ref_cnt for blk in shared] == [2, 2]
    kv.free(a)
    assert [blk.ref_cnt for blk in shared] == [1, 1]
    kv.free(b)
    assert [blk.ref_cnt for blk in shared] == [0, 0]
    # Freed but still cached: a third request hits them, taking them out of the free queue.
    c = make_request("c", prompt)
    free_before = kv.block_pool.num_free_blocks
    assert admit(kv, c) == 8
    assert kv.get_block_ids("c")[:2] == a_ids[:2]
    assert [blk.ref_cnt for blk in shared] == [1, 1]
    assert kv.block_pool.num_free_blocks == free_before - 3  # 2 hits + 1 new block


def test_a_different_first_block_means_no_hit_on_later_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    admit(kv, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Same second block, different first one: the chain differs, so nothing is shared.
    other = make_request("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert kv.get_computed_blocks(other) == ([], 0)


def test_hit_is_capped_so_that_one_token_is_computed():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    admit(kv, make_request("a", list(range(1, 13))))  # 3 full blocks, all cached
    # The same prompt again: the last block is recomputed to get logits.
    same = make_request("b", list(range(1, 13)))
    blocks, num_hit = kv.get_computed_blocks(same)
    assert num_hit == 8 and len(blocks) == 2
    # One token more: every cached block hits and only that token is computed.
    longer = make_request("c", list(range(1, 14)))
    assert kv.get_computed_blocks(longer)[1] == 12


def test_no_hits_when_prefix_caching_is_disabled():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=False)
    admit(kv, make_request("a", list(range(1, 13))))
    assert kv.get_computed_blocks(make_request("b", list(range(1, 14)))) == ([], 0)
    assert kv.block_pool.cached_blocks == {}


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=BS)  # 3 usable blocks
    admit(kv, make_request("a", list(range(1, 9))))
    big = make_request("b", list(range(20, 30)))
    assert kv.allocate_slots(big, 10) is None
    assert kv.block_pool.num_free_blocks == 1
    assert kv.get_block_ids("b") == []


def test_evictable_hits_count_against_free_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=BS)  # 3 usable
    a = make_request("a", list(range(1, 9)))
    admit(kv, a)
    kv.free(a)  # both blocks cached, unheld, in the free queue
    b = make_request("b", list(range(1, 9)) + list(range(50, 59)))  # 2 hit + 3 new needed
    blocks, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8
    # 3 free blocks, but 2 of them are the hits themselves: only 1 is left for new ones.
    assert kv.allocate_slots(b, 9, blocks) is None
    assert kv.block_pool.num_free_blocks == 3 and all(blk.ref_cnt == 0 for blk in blocks)


def test_blocks_are_freed_tail_first_so_the_tail_is_evicted_first():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(1, 13)))
    admit(kv, a)
    ids = kv.get_block_ids("a")
    kv.free(a)
    free_order = [b.block_id for b in kv.block_pool.free_queue]
    assert free_order[-3:] == ids[::-1]
    # New requests evict the never-used blocks first, then a's chain from its tail.
    fresh = kv.block_pool.get_new_blocks(4 + 1)
    assert fresh[-1].block_id == ids[-1]
    assert kv.get_computed_blocks(make_request("c", list(range(1, 13)) + [0]))[1] == 8


def test_allocating_more_tokens_than_the_request_has_is_an_error():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    r = make_request("a", [1, 2, 3])
    with pytest.raises(AssertionError, match="4 > 3"):
        kv.allocate_slots(r, 4)
    with pytest.raises(AssertionError, match="num_new_tokens=0"):
        kv.allocate_slots(r, 0)
