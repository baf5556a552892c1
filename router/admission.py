"""Admission: a token bucket per API key, and a bounded wait for a backend while none is free."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class TokenBucket:
    """`rate` tokens a second up to `burst`; take() spends one or says how long until one."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be positive and burst at least 1, got {rate}, {burst}.")
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.t = clock()

    def take(self) -> float:
        """0.0 when a token was spent, else the seconds until the next token."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """One bucket per API key (the Authorization header; anonymous callers share one)."""

    def __init__(self, rate: float, burst: int, max_keys: int = 10_000) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self.buckets: dict[str, TokenBucket] = {}

    def retry_after(self, key: str) -> int:
        """0 when admitted, else whole seconds for a Retry-After header."""
        if self.rate <= 0:
            return 0
        b = self.buckets.get(key)
        if b is None:
            if len(self.buckets) >= self.max_keys:  # bounded memory: drop the oldest key
                self.buckets.pop(next(iter(self.buckets)))
            b = self.buckets[key] = TokenBucket(self.rate, self.burst)
        wait = b.take()
        return 0 if wait == 0.0 else max(1, math.ceil(wait))
