"""An approximate index of which backend holds which prompt prefix, built from the router's own
routing history (SGLang's cache-aware router, without a tokenizer).

A prompt is cut into blocks of a fixed number of characters; block i is keyed by a hash chained
over blocks 0..i, so one key names a whole prefix. Each key maps to the backends that were sent
that prefix, and keys live in one LRU of bounded size: memory is O(max_blocks), never the
unbounded growth of production-stack's index (production-stack#687). Per backend, the number of
keys it holds (SGLang's tree size): where a prompt matches little, the backend holding the
least has the most cache to spare.
"""

from __future__ import annotations

from collections import OrderedDict


def block_keys(text: str, block_chars: int) -> list[int]:
    """The chained hash of each whole block of `text` (a trailing partial block is left out)."""
    keys, h = [], 0
    for i in range(0, len(text) - block_chars + 1, block_chars):
        h = hash((h, text[i : i + block_chars]))
        keys.append(h)
    return keys


class PrefixIndex:
    def __init__(self, block_chars: int = 64, max_blocks: int = 100_000) -> None:
        if block_chars < 1 or max_blocks < 1:
            raise ValueError(
                f"block_chars and max_blocks must be at least 1, got {block_chars}, {max_blocks}."
            )
        self.block_chars = block_chars
        self.max_blocks = max_blocks
        self._lru: OrderedDict[int, set[str]] = OrderedDict()
        self._sizes: dict[str, int] = {}  # backend -> keys that name it
        self.lookups = 0
        self.hit_blocks = 0
        self.total_blocks = 0

    def __len__(self) -> int:
        return len(self._lru)

    def size(self, backend: str) -> int:
        """How many prefix blocks the index believes `backend` holds."""
        return self._sizes.get(backend, 0)

    def keys(self, text: str) -> list[int]:
        return block_keys(text, self.block_chars)

    def match(self, keys: list[int], backends: list[str]) -> dict[str, int]:
        """Per backend: how many leading blocks of the prompt it was sent before."""
        out = dict.fromkeys(backends, 0)
        alive = set(backends)
        for depth, key in enumerate(keys):
            holders = self._lru.get(key)
            if not holders:
                break
            alive &= holders
            if not alive:
                break
            for b in alive:
                out[b] = depth + 1
        return out

    def record(self, keys: list[int], backend: str, matched: int = 0) -> None:
        """`backend` now holds every block of the prompt; refresh them in the LRU, evict the
        least recently used blocks beyond the limit."""
        self.lookups += 1
        self.total_blocks += len(keys)
        self.hit_blocks += matched
        lru, sizes = self._lru, self._sizes
        added = 0
        for key in keys:
            holders = lru.get(key)
            if holders is None:
                lru[key] = {backend}
                added += 1
            else:
                if backend not in holders:
                    holders.add(backend)
                    added += 1
                lru.move_to_end(key)
        sizes[backend] = sizes.get(backend, 0) + added
        while len(lru) > self.max_blocks:
            for b in lru.popitem(last=False)[1]:
                sizes[b] -= 1

    def forget(self, backend: str) -> None:
        """Drop a backend that left (its cache is gone)."""
        for key in [k for k, v in self._lru.items() if backend in v]:
            holders = self._lru[key]
            holders.discard(backend)
            if not holders:
                del self._lru[key]
        self._sizes.pop(backend, None)

    @property
    def hit_ratio(self) -> float:
        return self.hit_blocks / self.total_blocks if self.total_blocks else 0.0
