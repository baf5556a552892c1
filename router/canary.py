"""Canary analysis: the canary group's error rate and latency against stable's over a sliding
window; worse by a threshold, and the canary's weights go to 0 (an automatic rollback)."""

from __future__ import annotations

import logging
import time
from collections import deque

logger = logging.getLogger("ringserve.router")


class CanaryMonitor:
    def __init__(
        self,
        window_s: float = 60.0,
        min_requests: int = 20,
        error_margin: float = 0.1,
        latency_ratio: float = 2.0,
    ) -> None:
        self.window_s = window_s
        self.min_requests = min_requests
        self.error_margin = error_margin
        self.latency_ratio = latency_ratio
        self.samples: dict[str, deque] = {"stable": deque(), "canary": deque()}
        self.rolled_back: str | None = None  # the reason, once rolled back

    def observe(self, group: str, ok: bool, latency_s: float, now: float | None = None) -> None:
        q = self.samples.setdefault(group, deque())
        q.append((now if now is not None else time.monotonic(), ok, latency_s))

    def stats(self, group: str, now: float | None = None) -> tuple[int, float, float]:
        """(requests, error rate, mean latency of the successes) in the window."""
        now = now if now is not None else time.monotonic()
        q = self.samples.get(group, deque())
        while q and q[0][0] < now - self.window_s:
            q.popleft()
        n = len(q)
        if n == 0:
            return 0, 0.0, 0.0
        errors = sum(1 for _, ok, _ in q if not ok)
        lat = [x for _, ok, x in q if ok]
        return n, errors / n, (sum(lat) / len(lat) if lat else 0.0)

    def verdict(self, now: float | None = None) -> str | None:
        """Why the canary should be rolled back now, or None."""
        nc, ec, lc = self.stats("canary", now)
        ns, es, ls = self.stats("stable", now)
        if nc < self.min_requests or ns < self.min_requests:
            return None
        if ec > es + self.error_margin:
            return f"canary error rate {ec:.2f} > stable {es:.2f} + {self.error_margin}"
        if ls > 0 and lc > self.latency_ratio * ls:
            return f"canary latency {lc:.3f}s > {self.latency_ratio} x stable {ls:.3f}s"
        return None

    def check(self, backends) -> str | None:
        """Roll back (canary weights to 0) when the verdict says so; the reason, or None."""
        if not any(b.group == "canary" and b.weight > 0 for b in backends):
            return None
        reason = self.verdict()
        if reason is None:
            return None
        for b in backends:
            if b.group == "canary":
                b.weight = 0.0
        self.rolled_back = reason
        self.samples["canary"].clear()
        logger.warning("canary rolled back: %s", reason)
        return reason
