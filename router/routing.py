"""The routing logics: round-robin, least-loaded (power of two choices), session (consistent
hashing) and prefix-aware (longest cached prefix, gated by load balance)."""

from __future__ import annotations

import bisect
import hashlib
import random
import time
from dataclasses import dataclass

from router.backends import Backend
from router.prefix_index import PrefixIndex


@dataclass
class RouteInfo:
    """What a policy may look at: the conversation text and the session id."""

    prefix_text: str = ""
    session: str | None = None
    keys: list[int] | None = None  # the prompt's prefix-index keys, computed once


class Policy:
    name = "base"

    def __init__(self, stale_after: float = 2.0, rng: random.Random | None = None) -> None:
        self.stale_after = stale_after
        self.rng = rng or random.Random()

    def choose(self, candidates: list[Backend], info: RouteInfo) -> tuple[Backend, str]:
        raise NotImplementedError

    def record(self, backend: Backend, info: RouteInfo) -> None:
        """After dispatch: what the policy learns from its choice."""

    def forget(self, url: str) -> None:
        """A backend left."""

    def least_loaded(self, candidates: list[Backend]) -> Backend:
        """The lowest score; ties broken at random so that idle replicas share cold traffic."""
        now = time.monotonic()
        scores = [b.score(now, self.stale_after) for b in candidates]
        low = min(scores)
        return self.rng.choice([b for b, s in zip(candidates, scores, strict=True) if s == low])


class RoundRobin(Policy):
    """Smooth weighted round-robin (nginx's): weights 2:1 give a, b, a, a, b, a, ..."""

    name = "round-robin"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._current: dict[str, float] = {}

    def choose(self, candidates: list[Backend], info: RouteInfo) -> tuple[Backend, str]:
        total = sum(b.weight for b in candidates)
        best = None
        for b in sorted(candidates, key=lambda b: b.url):
            self._current[b.url] = self._current.get(b.url, 0.0) + b.weight
            if best is None or self._current[b.url] > self._current[best.url]:
                best = b
        self._current[best.url] -= total
        return best, "round-robin"

    def forget(self, url: str) -> None:
        self._current.pop(url, None)


class LeastLoaded(Policy):
    """Power of two choices: two backends drawn by weight, the less loaded one wins."""

    name = "least-loaded"

    def choose(self, candidates: list[Backend], info: RouteInfo) -> tuple[Backend, str]:
        if len(candidates) == 1:
            return candidates[0], "least-loaded"
        a = self.rng.choices(candidates, [b.weight for b in candidates])[0]
        rest = [b for b in candidates if b is not a]
        b = self.rng.choices(rest, [x.weight for x in rest])[0]
        return self.least_loaded([a, b]), "least-loaded"


def _h(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big")


class Session(Policy):
    """Consistent hashing of the session id onto a ring of virtual nodes: a backend that joins
    or leaves moves only its share of the sessions. No session id: least-loaded."""

    name = "session"
    VNODES = 100

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._ring: tuple | None = None  # (urls, sorted hashes, their owners), rebuilt on change

    def choose(self, candidates: list[Backend], info: RouteInfo) -> tuple[Backend, str]:
        if info.session is None:
            return self.least_loaded(candidates), "no-session"
        urls = tuple(sorted(b.url for b in candidates))
        if self._ring is None or self._ring[0] != urls:
            ring = sorted((_h(f"{u}#{i}"), u) for u in urls for i in range(self.VNODES))
            self._ring = (urls, [k for k, _ in ring], [u for _, u in ring])
        _, keys, owners = self._ring
        url = owners[bisect.bisect(keys, _h(info.session)) % len(keys)]
        return next(b for b in candidates if b.url == url), "session"


class PrefixAware(Policy):
    """SGLang's cache-aware policy on a char-block index. A prompt whose cached prefix is more
    than `cache_threshold` of it goes to the backend holding that prefix, unless that backend
    is overloaded against the least-loaded one (its load above the lowest by both
    `abs_threshold` requests and `rel_threshold` times); then to the least-loaded. A prompt
    matching less (a new conversation that shares only a system prompt, say) goes, while the
    pool is balanced by the same test, to the backend whose index holds the least (the most
    cache to spare), so new conversations spread over the pool instead of piling onto the
    backend that saw the shared prefix first (sglang#14305); imbalanced, to the least-loaded.
    Load is requests (Backend.requests), counted at dispatch, so equal overload on every
    backend keeps every conversation at home."""

    name = "prefix-aware"

    def __init__(
        self,
        index: PrefixIndex,
        abs_threshold: float = 8,
        rel_threshold: float = 1.5,
        *a,
        cache_threshold: float = 0.5,
        **kw,
    ) -> None:
        super().__init__(*a, **kw)
        self.index = index
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold
        self.cache_threshold = cache_threshold

    def _overloaded(self, x: float, low: float) -> bool:
        return x - low > self.abs_threshold and x > self.rel_threshold * low

    def choose(self, candidates: list[Backend], info: RouteInfo) -> tuple[Backend, str]:
        if info.keys is None:
            info.keys = self.index.keys(info.prefix_text)
        keys = info.keys
        now = time.monotonic()
        load = {b.url: b.requests(now, self.stale_after) for b in candidates}
        low, high = min(load.values()), max(load.values())
        match = self.index.match(keys, [b.url for b in candidates])
        best_len = max(match.values(), default=0)
        if best_len > self.cache_threshold * len(keys):
            best = [b for b in candidates if match[b.url] == best_len]
            pick = min(best, key=lambda b: load[b.url])
            if self._overloaded(load[pick.url], low):
                return self.least_loaded(candidates), "overloaded"
            return pick, "prefix-hit"
        if self._overloaded(high, low):
            return self.least_loaded(candidates), "imbalanced"
        # the most cache to spare; equal, the least loaded; equal, at random
        sizes = {b.url: self.index.size(b.url) for b in candidates}
        least = min(sizes.values())
        spare = [b for b in candidates if sizes[b.url] == least]
        return self.least_loaded(spare), "cold" if best_len == 0 else "low-match"

    def record(self, backend: Backend, info: RouteInfo) -> None:
        keys = info.keys if info.keys is not None else self.index.keys(info.prefix_text)
        matched = self.index.match(keys, [backend.url])[backend.url]
        self.index.record(keys, backend.url, matched)

    def forget(self, url: str) -> None:
        self.index.forget(url)


def make_policy(name: str, config) -> Policy:
    kw = {"stale_after": config.stale_after}
    if name == "round-robin":
        return RoundRobin(**kw)
    if name == "least-loaded":
        return LeastLoaded(**kw)
    if name == "session":
        return Session(**kw)
    if name == "prefix-aware":
        index = PrefixIndex(config.prefix_block_chars, config.prefix_max_blocks)
        return PrefixAware(
            index,
            config.balance_abs_threshold,
            config.balance_rel_threshold,
            cache_threshold=config.cache_threshold,
            **kw,
        )
    raise ValueError(f"unknown routing logic {name!r}")
