"""A per-backend circuit breaker: closed -> open after consecutive failures -> half-open after a
cool-down (one probe request at a time) -> closed on success, open again on failure."""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", HALF_OPEN: "half-open", OPEN: "open"}


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 5,
        cooldown_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, got {failure_threshold}.")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be non-negative, got {cooldown_s}.")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.failures = 0
        self._opened_at = 0.0
        self._state = CLOSED
        self._probing = False

    @property
    def state(self) -> int:
        if self._state == OPEN and self.clock() - self._opened_at >= self.cooldown_s:
            self._state, self._probing = HALF_OPEN, False
        return self._state

    def allows(self) -> bool:
        """Whether a request may go to the backend now (without taking the probe slot)."""
        s = self.state
        return s == CLOSED or (s == HALF_OPEN and not self._probing)

    def acquire(self) -> bool:
        """Take the right to send one request: always when closed, one probe when half-open."""
        s = self.state
        if s == CLOSED:
            return True
        if s == HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def cancel(self) -> None:
        """Give back a right taken with acquire() without sending the request."""
        self._probing = False

    def record_success(self) -> None:
        self.failures = 0
        self._state, self._probing = CLOSED, False

    def record_failure(self) -> None:
        self.failures += 1
        if self._state == HALF_OPEN or self.failures >= self.failure_threshold:
            self._state, self._opened_at, self._probing = OPEN, self.clock(), False


def backoff_delays(
    tries: int, base: float = 1.0, cap: float = 8.0, rng: Callable[[], float] | None = None
) -> list[float]:
    """The waits before tries 2..N: base * 2**k capped, each with +-25% jitter (rng in [0, 1))."""
    import random

    draw = rng or random.random
    out = []
    for k in range(tries - 1):
        d = min(cap, base * 2**k)
        out.append(d * (0.75 + 0.5 * draw()))
    return out
