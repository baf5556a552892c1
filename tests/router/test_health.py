"""Active health probes, in process against a mock transport: a replica slow to answer /health
(our frontend answers when its engine core ends a long prefill step) stays up within
--health-timeout and goes down past it, and it delays no other backend's probes."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from router.backends import BackendPool
from router.config import BackendSpec, RouterConfig, parse_args
from router.metrics import RouterMetrics

SLOW, FAST = "http://127.0.0.1:9001", "http://127.0.0.1:9002"


def _probe_for(seconds: float, health_timeout: float) -> tuple[dict, dict]:
    """Run the health loop for `seconds`, the SLOW backend answering /health after 1 s."""
    probes = {SLOW: 0, FAST: 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        url = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if request.url.path == "/health":
            probes[url] += 1
            if url == SLOW:
                await asyncio.sleep(1.0)
            return httpx.Response(200)
        return httpx.Response(200, json={"data": []})

    async def run() -> dict:
        cfg = RouterConfig(
            backends=[BackendSpec(SLOW), BackendSpec(FAST)],
            health_interval=0.05,
            health_timeout=health_timeout,
        )
        pool = BackendPool(cfg, RouterMetrics())
        pool._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        task = asyncio.create_task(pool._health_loop())
        pool._tasks.append(task)
        await asyncio.sleep(seconds)
        healthy = {u: b.healthy for u, b in pool.backends.items()}
        await pool.stop()
        return healthy

    return asyncio.run(run()), probes


def test_a_slow_health_answer_within_the_timeout_is_healthy():
    healthy, probes = _probe_for(2.6, health_timeout=3.0)
    assert healthy == {SLOW: True, FAST: True}
    # one probe in flight at a time for the slow one; the fast one probed every interval
    assert 2 <= probes[SLOW] <= 3
    assert probes[FAST] >= 20


def test_a_health_answer_later_than_the_timeout_marks_down():
    healthy, probes = _probe_for(1.5, health_timeout=0.2)
    assert healthy == {SLOW: False, FAST: True}
    assert probes[FAST] >= 15


def test_health_timeout_config():
    cfg, _ = parse_args(["--backends", "http://h:1", "--health-timeout", "4"])
    assert cfg.health_timeout == 4.0
    assert RouterConfig(backends_dns="h:1").health_timeout == 10.0
    with pytest.raises(ValueError, match="health_timeout"):
        RouterConfig(backends_dns="h:1", health_timeout=0)
