"""KVCacheManager: each request's block table, prefix-cache lookups and slot allocation."""

from __future__ import annotations

from collections.abc import Sequence

from engine_core.sched.block_pool import BlockPool, KVCacheBlock
from engine_core.sched.request import Request


class KVCacheManager:
    """Maps requests to blocks of a BlockPool; the scheduler's only door to the KV cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # How many leading blocks of each request went through cache_full_blocks already.
        self.num_cached_blocks: dict[str, int] = {}
        # Trailing blocks freed from a request's table since the runner last saw it.
        self._num_dropped_blocks: dict[str, int] = {}

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    @property
    def num_usable_blocks(self) -> int:
        """Blocks a request can ever hold: the whole pool but the null block."""
        return self.block_pool.num_usable_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether a sequence of num_tokens fits in the whole pool (if it were all free)."""
        return self.num_blocks_for(num_tokens) <= self.num_usable_blocks

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of a request not yet scheduled: (blocks, num_tokens).

        The hit stops one token short of the whole sequence, rounded down to a block, so
        that at least one token is computed and yields logits to sample from.
        """
        if not self.enable_caching or request.num_computed_tokens > 0:
            return [], 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        blocks = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
        num_lookahead_tokens: int = 0,
    ) -> list[int] | None:
        """Make room for num_new_tokens more tokens of a request; None if the pool is short.

        new_computed_blocks (a prefix hit from get_computed_blocks) are taken into the
        request's table first. Returns the ids of the blocks appended to its table. Full
        blocks are cached at once, so that a request scheduled later in the same step can
        hit them: the runner writes every new K/V of a step before any attention reads it.
        num_lookahead_tokens: slots past the request's tokens (draft tokens); their blocks
        are never cached, since a rejected draft's K/V must never be a prefix hit.
        """
        assert num_new_tokens >= 1, f"num_new_tokens={num_new_tokens}"
        bs = self.block_size
        req_id = request.request_id
        req_blocks = self.req_to_blocks.get(req_id)
        if req_blocks is None:
            req_blocks = []
        num_total = request.num_computed_tokens + len(new_computed_blocks) * bs + num_new_tokens
        assert num_total <= len(request.all_token_ids), (
            f"{req_id!r}: {num_total} > {request.num_tokens}"
        )
        num_slots = num_total + num_lookahead_tokens
        num_new_blocks = -(-num_slots // bs) - len(req_blocks) - len(new_computed_blocks)
        pool = self.block_pool
        if num_new_blocks > 0 or new_computed_blocks:
            # Hit blocks nobody holds count as free, but taking them removes them from the queue.
            num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
            if num_new_blocks > pool.num_free_blocks - num_evictable_hits:
                return None
        if not req_blocks:
            self.req_to_blocks[req_id] = req_blocks
        if new_computed_blocks:
            pool.touch(new_computed_blocks)
            req_blocks.extend(new_computed_blocks)
            self.num_cached_blocks[req_id] = len(req_blocks)
        new_blocks = pool.get_new_blocks(num_new_blocks) if num_new_blocks > 0 else []
        req_blocks.extend(new_blocks)

        if self.enable_caching:
            num_full = num_total // bs
            num_cached = self.num_cached_blocks.get(req_id, 0)
            if num_full > num_cached:
                pool.cache_full_blocks(req_blocks, request.block_hashes, num_cached, num_full)
                self.num_cached_blocks[req_id] = num_full
        return [b.block_id for b in new_blocks]

    def free_past_computed(self, request: Request) -> int:
        """Free the request's trailing blocks that hold no computed token; returns how many.

        They held lookahead slots only (rejected drafts): never cached, never shared. They
        go to the head of the free queue, to be handed out before any cached block is evicted.
        The runner learns of them from take_num_dropped_blocks.
        """
        req_id = request.request_id
        blocks = self.req_to_blocks.get(req_id)
        if not blocks:
            return 0
        keep = self.num_blocks_for(request.num_computed_tokens)
        dropped = blocks[keep:]
        if not dropped:
            return 0
        assert self.num_cached_blocks.get(req_id, 0) <= keep, f"{req_id!r}: dropping a cached block"
        assert all(b.ref_cnt == 1 and b.block_hash is None for b in dropped), dropped
        del blocks[keep:]
        self.block_pool.free_blocks(dropped, to_front=True)
        self._num_dropped_blocks[req_id] = self._num_dropped_blocks.get(req_id, 0) + len(dropped)
        return len(dropped)

    def take_num_dropped_blocks(self, request_id: str) -> int:
        """Blocks dropped from the end of the request's table since the last call (for the
        runner's copy of the table, before it appends the step's new blocks)."""
        return self._num_dropped_blocks.pop(request_id, 0)

    def num_blocks_held(self, request_id: str) -> int:
        return len(self.req_to_blocks.get(request_id, ()))

    def free(self, request: Request) -> None:
        """Release a request's blocks, tail first so that the end of its chain is evicted first."""
        blocks = self.req_to_blocks.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        self._num_dropped_blocks.pop(request.request_id, None)
        if blocks:
            self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()
