"""The router's command line and settings: backends as URL@WEIGHT:GROUP, policies, limits."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from urllib.parse import urlparse

BACKEND_KEY_ENV = "ROUTER_BACKEND_API_KEY"
ROUTING_LOGICS = ("round-robin", "least-loaded", "session", "prefix-aware")
GROUPS = ("stable", "canary")


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One `--backends` entry: base URL, traffic weight, and group (stable or canary)."""

    url: str
    weight: float = 1.0
    group: str = "stable"


def parse_backend(entry: str) -> BackendSpec:
    """`http://h:p[@WEIGHT[:GROUP]]`; a bad part raises ValueError naming it."""
    url, _, extra = entry.strip().partition("@")
    url = url.rstrip("/")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"backend URL must be http(s)://HOST:PORT, got {entry!r}.")
    weight, group = 1.0, "stable"
    if extra:
        w, _, g = extra.partition(":")
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"backend weight must be a number, got {w!r} in {entry!r}.") from None
        if weight < 0:
            raise ValueError(f"backend weight must be non-negative, got {weight} in {entry!r}.")
        group = g or "stable"
        if group not in GROUPS:
            raise ValueError(f"backend group must be one of {GROUPS}, got {group!r}.")
    return BackendSpec(url, weight, group)


@dataclass(slots=True)
class RouterConfig:
    """Everything the router process is configured with."""

    backends: list[BackendSpec] = field(default_factory=list)
    backends_dns: str | None = None  # HOST:PORT, re-resolved every dns_interval seconds
    dns_interval: float = 5.0
    routing_logic: str = "prefix-aware"
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    admin_key: str | None = None
    # The router's own credential for backends started with --api-key: sent on probes,
    # scrapes, /v1/models and every proxied request (in place of the client's header).
    backend_api_key: str | None = None
    session_key: str = "x-session-id"
    # prefix-aware
    prefix_block_chars: int = 64
    prefix_max_blocks: int = 100_000
    balance_abs_threshold: int = 8
    balance_rel_threshold: float = 1.5
    cache_threshold: float = 0.5
    # load signals and health
    scrape_interval: float = 0.1
    stale_after: float = 2.0
    health_interval: float = 1.0
    # A replica in a long prefill step answers /health when the step ends (our frontend asks
    # its engine core, which answers between steps): seconds on one core under load.
    health_timeout: float = 10.0
    health_fail_threshold: int = 2
    health_ok_threshold: int = 1
    # retries
    max_tries: int = 3
    backoff_base: float = 1.0
    backoff_cap: float = 8.0
    request_timeout: float = 600.0  # overall, per client request
    connect_timeout: float = 5.0
    first_byte_timeout: float = 120.0
    max_failovers: int = 3
    # circuit breaker
    circuit_failures: int = 5
    circuit_cooldown: float = 10.0
    # admission
    rate_limit: float = 0.0  # requests per second per API key; 0: no limit
    rate_burst: int = 20
    max_queue: int = 256
    queue_timeout: float = 30.0
    max_in_flight_per_backend: int = 0  # 0: no router-side cap
    # canary
    canary_window: float = 60.0
    canary_min_requests: int = 20
    canary_error_margin: float = 0.1  # rollback when canary's error rate exceeds stable's by this
    canary_latency_ratio: float = 2.0  # ... or its mean latency is this many times stable's

    def backend_headers(self) -> dict[str, str]:
        """The Authorization header the router's own calls to backends carry."""
        key = self.backend_api_key
        return {"authorization": f"Bearer {key}"} if key else {}

    def __post_init__(self) -> None:
        if not self.backends and not self.backends_dns:
            raise ValueError("give --backends URL[,URL...] or --backends-dns HOST:PORT.")
        if self.backends and self.backends_dns:
            raise ValueError("give only one of --backends and --backends-dns.")
        if self.backends_dns:
            host, _, port = self.backends_dns.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--backends-dns must be HOST:PORT, got {self.backends_dns!r}.")
        if self.routing_logic not in ROUTING_LOGICS:
            raise ValueError(
                f"routing_logic must be one of {ROUTING_LOGICS}, got {self.routing_logic!r}."
            )
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}.")
        for name in ("api_key", "admin_key", "backend_api_key"):
            if getattr(self, name) == "":
                raise ValueError(f"{name} must not be empty (leave it out to disable it).")
        for name in ("dns_interval", "scrape_interval", "health_interval", "health_timeout",
                     "backoff_base"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.max_tries < 1:
            raise ValueError(f"max_tries must be at least 1, got {self.max_tries}.")
        if self.prefix_block_chars < 1 or self.prefix_max_blocks < 1:
            raise ValueError("prefix_block_chars and prefix_max_blocks must be at least 1.")
        if not 0 <= self.cache_threshold <= 1:
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold}.")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1:
            raise ValueError(
                "balance_abs_threshold must be >= 0 and balance_rel_threshold >= 1, got "
                f"{self.balance_abs_threshold} and {self.balance_rel_threshold}."
            )
        if self.rate_limit < 0 or self.rate_burst < 1 or self.max_queue < 0:
            raise ValueError("rate_limit must be >= 0, rate_burst >= 1, max_queue >= 0.")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m router",
        description="ringserve router: one OpenAI endpoint in front of many engine replicas.",
    )
    p.add_argument("--backends", default=None, help="URL[@WEIGHT[:GROUP]][,...]")
    p.add_argument("--backends-dns", default=None, help="HOST:PORT, re-resolved periodically")
    p.add_argument("--dns-interval", type=float, default=5.0)
    p.add_argument("--routing-logic", default="prefix-aware", choices=ROUTING_LOGICS)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    p.add_argument("--admin-key", default=None, help="guards POST /admin/weights")
    p.add_argument(
        "--backend-api-key",
        default=None,
        help=f"the backends' API key (or ${BACKEND_KEY_ENV}); without it the client's "
        "Authorization header is forwarded",
    )
    p.add_argument("--session-key", default="x-session-id", help="header or body field")
    p.add_argument("--prefix-block-chars", type=int, default=64)
    p.add_argument("--prefix-max-blocks", type=int, default=100_000)
    p.add_argument("--balance-abs-threshold", type=int, default=8)
    p.add_argument("--balance-rel-threshold", type=float, default=1.5)
    p.add_argument(
        "--cache-threshold",
        type=float,
        default=0.5,
        help="prefix-aware: a prompt whose cached prefix is at most this share of it goes to "
        "the backend with the most cache to spare",
    )
    p.add_argument("--scrape-interval", type=float, default=0.1)
    p.add_argument("--health-interval", type=float, default=1.0)
    p.add_argument(
        "--health-timeout",
        type=float,
        default=10.0,
        help="a /health probe answered later than this is a failure",
    )
    p.add_argument("--max-tries", type=int, default=3)
    p.add_argument("--backoff-base", type=float, default=1.0)
    p.add_argument("--backoff-cap", type=float, default=8.0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--first-byte-timeout", type=float, default=120.0)
    p.add_argument("--circuit-failures", type=int, default=5)
    p.add_argument("--circuit-cooldown", type=float, default=10.0)
    p.add_argument("--rate-limit", type=float, default=0.0, help="req/s per API key (0: off)")
    p.add_argument("--rate-burst", type=int, default=20)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--queue-timeout", type=float, default=30.0)
    p.add_argument("--max-in-flight-per-backend", type=int, default=0)
    p.add_argument("--canary-window", type=float, default=60.0)
    p.add_argument("--canary-min-requests", type=int, default=20)
    p.add_argument("--canary-error-margin", type=float, default=0.1)
    p.add_argument("--canary-latency-ratio", type=float, default=2.0)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def parse_args(argv: list[str] | None = None) -> tuple[RouterConfig, str]:
    """The config and the log level; a bad value exits with a usage error naming it."""
    parser = make_parser()
    ns = parser.parse_args(argv)
    kwargs = {k: v for k, v in vars(ns).items() if k not in ("backends", "log_level")}
    if kwargs["backend_api_key"] is None:  # the environment keeps it off `ps` output
        kwargs["backend_api_key"] = os.environ.get(BACKEND_KEY_ENV) or None
    try:
        backends = [parse_backend(e) for e in (ns.backends or "").split(",") if e.strip()]
        config = RouterConfig(backends=backends, **kwargs)
    except ValueError as e:
        parser.error(str(e))
    return config, ns.log_level
