"""BlockPool: owns the KV cache blocks, their reference counts, the free queue and the hash map.

A block with ref_cnt 0 sits in the free queue, most recently freed last; it may still hold a
cached prefix (its hash stays in the map) until it is evicted by being handed out again.
Block 0 is the null block: never handed out, so that a runner may point padding slots at it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence

import msgspec

BlockHash = bytes  # SHA-256 digest

# The parent of a request's first block: a constant, so that hashes are the same in every process.
ROOT_BLOCK_HASH: BlockHash = hashlib.sha256(b"ringserve/kv-cache-block-root").digest()

_encode = msgspec.msgpack.Encoder().encode


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple | None = None
) -> BlockHash:
    """The SHA-256 of one full block, chained to its parent so equal hashes mean equal prefixes."""
    parent = ROOT_BLOCK_HASH if parent_hash is None else parent_hash
    return hashlib.sha256(_encode((parent, token_ids, extra_keys))).digest()


class KVCacheBlock:
    """One block of block_size token slots in every layer's KV cache."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None  # set while the block is in the hash map
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash else None
        return f"KVCacheBlock({self.block_id}, ref_cnt={self.ref_cnt}, hash={h})"


class FreeBlockQueue:
    """A doubly linked list of free blocks in eviction order (LRU first), O(1) anywhere."""

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        # Sentinels spare every operation the empty-list and end-of-list branches.
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        assert block is not None and block is not self._tail, "no free KV cache block left to pop"
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"block {block.block_id} is not free"
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def appendleft(self, block: KVCacheBlock) -> None:
        first = self._head.next_free
        assert first is not None, "the head sentinel always has a successor"
        self._head.next_free = block
        block.prev_free = self._head
        block.next_free = first
        first.prev_free = block
        self.num_free_blocks += 1

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free
        assert last is not None, "the tail sentinel always has a predecessor"
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free_blocks += 1

    def __iter__(self) -> Iterator[KVCacheBlock]:
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free

    def __len__(self) -> int:
        return self.num_free_blocks


class BlockPool:
    """All KV cache blocks: hands out free ones (evicting their cached prefix), shares cached ones."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        assert num_blocks >= 2, f"block 0 is the null block: {num_blocks} blocks are too few"
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.ref_cnt = 1  # held forever: it never enters the free queue
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self.cached_blocks: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds, cached ones included (they are evicted on demand)."""
        return self.free_queue.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks held by requests."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached_blocks.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take num_blocks from the head of the free queue (evicting their prefixes), ref_cnt 1."""
        assert num_blocks <= self.free_queue.num_free_blocks, f"only {self.num_free_blocks} free"
        new_blocks = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            if block.block_hash is not None:
                del self.cached_blocks[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            new_blocks.append(block)
        return new_blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a hold on cached blocks: out of the free queue if nobody held them."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock], to_front: bool = False) -> None:
        """Drop one hold on each block; unheld ones join the free queue in the given order, at
        its tail (evicted last), or at its head with to_front (blocks holding nothing of use)."""
        queue = self.free_queue
        add = queue.appendleft if to_front else queue.append
        for block in ordered_blocks:
            assert block.ref_cnt > 0, f"block {block.block_id} freed more often than held"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                add(block)

    def cache_full_blocks(
        self,
        blocks: Sequence[KVCacheBlock],
        block_hashes: Sequence[BlockHash],
        num_cached_blocks: int,
        num_full_blocks: int,
    ) -> None:
        """Put blocks[num_cached_blocks:num_full_blocks] in the hash map under their hashes."""
        if not self.enable_caching:
            return
        for i in range(num_cached_blocks, num_full_blocks):
            block = blocks[i]
            block_hash = block_hashes[i]
            # A block already cached (a hit) keeps its entry; a duplicate of a block another
            # request filled at the same time stays unhashed and is simply freed later.
            if block.block_hash is None and block_hash not in self.cached_blocks:
                block.block_hash = block_hash
                self.cached_blocks[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; refused (False) while any block is held."""
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        for block in self.cached_blocks.values():
            block.block_hash = None
        self.cached_blocks.clear()
        return True
