"""The router's Prometheus metrics: production-stack's names plus the router_* extras."""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]


class RouterMetrics:
    """One registry per router (tests start several in one process)."""

    def __init__(self) -> None:
        prometheus_client.disable_created_metrics()
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.healthy_pods = Gauge("vllm:healthy_pods_total", "Healthy backends.", registry=r)
        self.current_qps = Gauge(
            "vllm:current_qps", "Requests per second sent to a backend.", ["server"], registry=r
        )
        self.incoming = Counter(
            "vllm:num_incoming_requests",
            "Requests dispatched to a backend.",
            ["server"],
            registry=r,
        )
        self.errors = Counter(
            "vllm:request_errors", "Failed requests to a backend.", ["server"], registry=r
        )
        self.retries = Counter("router_retries", "Requests retried on a backend.", registry=r)
        self.failovers = Counter(
            "router_failovers", "Streams continued on another backend.", registry=r
        )
        self.circuit_state = Gauge(
            "router_circuit_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open.",
            ["backend"],
            registry=r,
        )
        self.prefix_hit_ratio = Gauge(
            "router_prefix_index_hit_ratio",
            "Fraction of prompt blocks the prefix index matched on the chosen backend.",
            registry=r,
        )
        self.decisions = Counter(
            "router_routing_decisions",
            "Routing decisions by backend and reason.",
            ["backend", "reason"],
            registry=r,
        )
        self.latency = Histogram(
            "router_request_latency_seconds",
            "Request latency per backend (dispatch to last byte).",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "router_queue_depth", "Requests waiting in the router.", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
