"""The backends: their health, load signals (scraped /metrics), circuit breaker, and the pool
that adds and drains them (static --backends, or --backends-dns re-resolved periodically)."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections import deque
from dataclasses import dataclass, field

import httpx

from router.circuit import CircuitBreaker
from router.config import BackendSpec, RouterConfig
from router.metrics import RouterMetrics

logger = logging.getLogger("ringserve.router")

_SCRAPED = {
    "vllm:num_requests_waiting": "waiting",
    "vllm:num_requests_running": "running",
    "vllm:kv_cache_usage_perc": "kv_usage",
}
_LINE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{[^}]*\})? (\S+)", re.M)


def parse_load(text: str) -> dict[str, float]:
    """The load gauges of a vLLM-style /metrics page, summed over label sets."""
    out = dict.fromkeys(_SCRAPED.values(), 0.0)
    for name, value in _LINE.findall(text):
        key = _SCRAPED.get(name)
        if key is not None:
            try:
                out[key] += float(value)
            except ValueError:
                pass
    return out


@dataclass(eq=False)
class Backend:
    url: str
    weight: float = 1.0
    group: str = "stable"
    circuit: CircuitBreaker = field(default_factory=CircuitBreaker)
    healthy: bool = True  # optimistic until the first probe says otherwise
    removed: bool = False  # left the DNS answer: drained, then dropped
    in_flight: int = 0
    ringserve: bool = False  # our frontend: token-exact failover extensions
    load: dict[str, float] = field(default_factory=dict)
    scraped_at: float = -1e9
    _fails: int = 0
    _oks: int = 0
    _sent: deque = field(default_factory=deque)  # dispatch times, for current_qps

    def requests(self, now: float, stale_after: float) -> float:
        """Requests on the replica, per unit of weight: the router's own in-flight count (counted
        at dispatch, so a burst is seen before the next scrape) or, while the last scrape is
        fresh, the replica's running + waiting if more (other routers' requests). Not their
        sum: a request this router sent that waits in the replica is in both."""
        n = float(self.in_flight)
        if now - self.scraped_at <= stale_after:
            n = max(n, self.load.get("running", 0.0) + self.load.get("waiting", 0.0))
        return n / max(self.weight, 1e-9)

    def score(self, now: float, stale_after: float) -> float:
        """requests() plus the replica's KV use (0 to 1, while fresh): among replicas with as
        many requests, the one with the fuller cache scores higher."""
        s = self.requests(now, stale_after)
        if now - self.scraped_at <= stale_after:
            s += self.load.get("kv_usage", 0.0) / max(self.weight, 1e-9)
        return s

    def qps(self, now: float, window: float = 10.0) -> float:
        while self._sent and self._sent[0] < now - window:
            self._sent.popleft()
        return len(self._sent) / window

    def note_dispatch(self, now: float) -> None:
        self.in_flight += 1
        self._sent.append(now)


class BackendPool:
    """The live set of backends and the loops that keep it current."""

    def __init__(self, config: RouterConfig, metrics: RouterMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.backends: dict[str, Backend] = {}
        self.changed = asyncio.Event()  # set when a backend may have become available
        self.on_remove: list = []  # callbacks(url) when a backend is dropped
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task] = []
        self._probing: set[str] = set()
        self._probes: set[asyncio.Task] = set()
        self._warned: set[str] = set()  # backends whose 401 on /metrics was logged
        self.probe_headers = config.backend_headers()  # backends behind an API key
        for spec in config.backends:
            self.add(spec)

    def add(self, spec: BackendSpec) -> Backend:
        b = self.backends.get(spec.url)
        if b is not None:
            b.removed = False
            return b
        c = self.config
        b = Backend(
            spec.url,
            spec.weight,
            spec.group,
            CircuitBreaker(c.circuit_failures, c.circuit_cooldown),
        )
        self.backends[spec.url] = b
        # Per-backend series exist from the start (at 0), so dashboards and alert rules on
        # rate(...) have data before the first request or error.
        self.metrics.incoming.labels(b.url)
        self.metrics.errors.labels(b.url)
        logger.info("backend added: %s (weight %g, %s)", spec.url, spec.weight, spec.group)
        self.notify()
        return b

    def notify(self) -> None:
        self.changed.set()

    def available(self, exclude: set[str] = frozenset()) -> list[Backend]:
        cap = self.config.max_in_flight_per_backend
        return [
            b
            for b in self.backends.values()
            if b.healthy
            and not b.removed
            and b.weight > 0
            and b.url not in exclude
            and b.circuit.allows()
            and (cap <= 0 or b.in_flight < cap)
        ]

    def update_gauges(self) -> None:
        now = time.monotonic()
        self.metrics.healthy_pods.set(
            sum(1 for b in self.backends.values() if b.healthy and not b.removed)
        )
        for b in self.backends.values():
            self.metrics.circuit_state.labels(b.url).set(b.circuit.state)
            self.metrics.current_qps.labels(b.url).set(b.qps(now))

    # ---------------------------------------------------------------- passive marking

    def mark_failure(self, b: Backend, connect_error: bool) -> None:
        b.circuit.record_failure()
        self.metrics.errors.labels(b.url).inc()
        if connect_error and b.healthy:
            b.healthy, b._oks = False, 0
            logger.warning("backend %s marked down (connection failed)", b.url)
        self.update_gauges()

    def mark_success(self, b: Backend) -> None:
        b.circuit.record_success()

    def release(self, b: Backend) -> None:
        b.in_flight -= 1
        if b.removed and b.in_flight <= 0:
            self._drop(b)
        self.notify()

    def _drop(self, b: Backend) -> None:
        if self.backends.get(b.url) is b and b.removed and b.in_flight <= 0:
            del self.backends[b.url]
            logger.info("backend removed: %s", b.url)
            for cb in self.on_remove:
                cb(b.url)

    # ---------------------------------------------------------------- loops

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(2.0, connect=1.0))
        if self.config.backends_dns:
            await self.resolve_once()
            self._tasks.append(asyncio.create_task(self._dns_loop()))
        self._tasks.append(asyncio.create_task(self._health_loop()))
        self._tasks.append(asyncio.create_task(self._scrape_loop()))

    async def stop(self) -> None:
        tasks = self._tasks + list(self._probes)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def resolve_once(self) -> None:
        """Resolve --backends-dns with the system resolver (a Kubernetes headless Service: one
        address per ready pod); add the new addresses, drain the vanished ones."""
        host, _, port = self.config.backends_dns.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as e:
            logger.warning("DNS lookup of %s failed: %s (keeping the backends)", host, e)
            return
        urls = set()
        for family, *_, addr in infos:
            ip = addr[0]
            urls.add(
                f"http://[{ip}]:{port}" if family == socket.AF_INET6 else f"http://{ip}:{port}"
            )
        for url in sorted(urls):
            self.add(BackendSpec(url))
        for b in list(self.backends.values()):
            if b.url not in urls and not b.removed:
                b.removed = True
                logger.info("backend %s left the DNS answer: draining", b.url)
                self._drop(b)
        self.update_gauges()

    async def _dns_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.dns_interval)
            await self.resolve_once()

    async def _health_loop(self) -> None:
        """A probe per backend every interval, each on its own: a backend slow to answer (up
        to --health-timeout) delays nobody else's probes; it gets no second probe meanwhile."""
        while True:
            for b in list(self.backends.values()):
                if b.url not in self._probing:
                    self._probing.add(b.url)
                    task = asyncio.create_task(self._probe(b))
                    self._probes.add(task)
                    task.add_done_callback(self._probes.discard)
            self.update_gauges()
            await asyncio.sleep(self.config.health_interval)

    async def _probe(self, b: Backend) -> None:
        self._probing.add(b.url)
        try:
            try:  # a deadline on the whole answer, not httpx's per-read timeout
                r = await asyncio.wait_for(
                    self._client.get(f"{b.url}/health", headers=self.probe_headers, timeout=None),
                    self.config.health_timeout,
                )
                ok = r.status_code == 200
            except (httpx.HTTPError, asyncio.TimeoutError):
                ok = False
            if ok and not b.ringserve:
                b.ringserve = await self._is_ringserve(b)
            c = self.config
            if ok:
                b._fails, b._oks = 0, b._oks + 1
                if not b.healthy and b._oks >= c.health_ok_threshold:
                    b.healthy = True
                    logger.info("backend %s is up", b.url)
                    self.notify()
            else:
                b._oks, b._fails = 0, b._fails + 1
                if b.healthy and b._fails >= c.health_fail_threshold:
                    b.healthy = False
                    logger.warning("backend %s is down (health probe failed)", b.url)
        finally:
            self._probing.discard(b.url)

    async def _is_ringserve(self, b: Backend) -> bool:
        try:
            r = await self._client.get(f"{b.url}/v1/models", headers=self.probe_headers)
            return any(m.get("owned_by") == "ringserve" for m in r.json().get("data", []))
        except (httpx.HTTPError, ValueError, AttributeError):
            return False

    async def _scrape_loop(self) -> None:
        while True:
            await asyncio.gather(
                *(self._scrape(b) for b in list(self.backends.values()) if b.healthy),
                return_exceptions=True,
            )
            await asyncio.sleep(self.config.scrape_interval)

    async def _scrape(self, b: Backend) -> None:
        try:
            r = await self._client.get(f"{b.url}/metrics", headers=self.probe_headers)
        except httpx.HTTPError:
            return
        if r.status_code == 200:
            b.load = parse_load(r.text)
            b.scraped_at = time.monotonic()
        elif r.status_code in (401, 403) and b.url not in self._warned:
            self._warned.add(b.url)
            logger.warning(
                "backend %s answers /metrics with %d: give the router its key "
                "(--backend-api-key or $ROUTER_BACKEND_API_KEY)",
                b.url,
                r.status_code,
            )
