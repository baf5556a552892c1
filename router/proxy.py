"""Forwarding: choose a backend (waiting in a bounded queue while none is free), retry failures
before the first byte with exponential backoff and jitter, pass 4xx through, and relay streams,
failing over mid-stream to another backend as a continuation."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx
from starlette.responses import Response, StreamingResponse

from router.backends import Backend, BackendPool
from router.canary import CanaryMonitor
from router.circuit import backoff_delays
from router.config import RouterConfig
from router.metrics import RouterMetrics
from router.relay import Relay, events_of
from router.routing import Policy, RouteInfo
from router.stream import StreamState, can_failover

logger = logging.getLogger("ringserve.router")
_FORWARD_HEADERS = ("authorization", "content-type", "x-request-id", "accept")
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class RouterError(Exception):
    """A request the router itself answers: an OpenAI-shaped error body with this status."""

    def __init__(self, message: str, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.headers = message, status, headers or {}

    def response(self) -> Response:
        return json_response(error_body(self.message, self.status), self.status, self.headers)


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable_error"}  # fmt: skip


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object, with the HTTP status as the code (as vLLM and our frontend)."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def json_response(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(obj), status, headers, media_type="application/json")


def prefix_text(body: Any) -> str:
    """The text whose prefix the backend caches: the whole conversation, every message."""
    if not isinstance(body, dict):
        return ""
    msgs = body.get("messages")
    if isinstance(msgs, list):
        parts = []
        for m in msgs:
            if isinstance(m, dict):
                c = m.get("content")
                if isinstance(c, list):
                    c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
                parts.append(f"\x1e{m.get('role')}\x1f{c or ''}")
        return "".join(parts)
    p = body.get("prompt")
    if isinstance(p, list) and p and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, list):
        return " ".join(str(x) for x in p)  # token ids: blocks of their decimal text
    return p if isinstance(p, str) else ""


class Proxy:
    def __init__(
        self,
        config: RouterConfig,
        pool: BackendPool,
        policy: Policy,
        metrics: RouterMetrics,
        canary: CanaryMonitor,
    ) -> None:
        self.config, self.pool, self.policy = config, pool, policy
        self.metrics, self.canary = metrics, canary
        self.waiting = 0
        timeout = httpx.Timeout(config.first_byte_timeout, connect=config.connect_timeout)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits)
        self.sleep = asyncio.sleep  # tests may speed time up

    async def close(self) -> None:
        await self.client.aclose()

    # ---------------------------------------------------------------- choosing a backend

    async def acquire(self, info: RouteInfo, exclude: set[str]) -> Backend:
        """A backend for this request, its in-flight count taken; waits in the bounded queue
        while none is available (all down or busy), up to the queue timeout."""
        deadline = time.monotonic() + self.config.queue_timeout
        queued = False
        try:
            while True:
                cands = self.pool.available(exclude) or self.pool.available()
                while cands:
                    b, reason = self.policy.choose(cands, info)
                    if b.circuit.acquire():
                        b.note_dispatch(time.monotonic())
                        self.policy.record(b, info)
                        self.metrics.decisions.labels(b.url, reason).inc()
                        self.metrics.incoming.labels(b.url).inc()
                        idx = getattr(self.policy, "index", None)
                        if idx is not None:
                            self.metrics.prefix_hit_ratio.set(idx.hit_ratio)
                        return b
                    cands = [c for c in cands if c is not b]
                if not queued:
                    if self.waiting >= self.config.max_queue:
                        raise RouterError(
                            "The router's queue is full. Retry later.", 429, {"Retry-After": "1"}
                        )
                    queued = True
                    self.waiting += 1
                    self.metrics.queue_depth.set(self.waiting)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RouterError(
                        f"No backend became available within {self.config.queue_timeout} s.",
                        503,
                        {"Retry-After": "1"},
                    )
                self.pool.changed.clear()
                try:
                    await asyncio.wait_for(self.pool.changed.wait(), min(left, 0.25))
                except asyncio.TimeoutError:
                    pass
        finally:
            if queued:
                self.waiting -= 1
                self.metrics.queue_depth.set(self.waiting)

    def _failed(
        self, b: Backend, t0: float, exclude: set[str], connect_error: bool = False
    ) -> None:
        """A try that failed on b before any byte reached the client: mark b, try elsewhere."""
        self.pool.mark_failure(b, connect_error)
        self._done(b, False, t0)
        exclude.add(b.url)

    def _done(self, b: Backend, ok: bool, t0: float) -> None:
        latency = time.monotonic() - t0
        self.metrics.latency.labels(b.url).observe(latency)
        self.canary.observe(b.group, ok, latency)
        self.pool.release(b)

    # ---------------------------------------------------------------- forwarding

    async def _open(self, b: Backend, path: str, headers: dict, content: bytes) -> httpx.Response:
        req = self.client.build_request("POST", b.url + path, headers=headers, content=content)
        return await self.client.send(req, stream=True)

    async def handle(self, path: str, raw: bytes, headers: dict[str, str]) -> Response:
        t_start = time.monotonic()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None  # forwarded as is: the backend answers with its own 400
        chat = path.endswith("/chat/completions")
        stream = isinstance(body, dict) and body.get("stream") is True
        info = RouteInfo(prefix_text(body), self._session(headers, body))
        fwd = {k: v for k, v in headers.items() if k in _FORWARD_HEADERS}
        fwd.setdefault("content-type", "application/json")
        fwd.update(self.config.backend_headers())  # the router's key, not the client's
        delays = backoff_delays(
            self.config.max_tries, self.config.backoff_base, self.config.backoff_cap
        )
        exclude: set[str] = set()
        last: tuple[int, bytes, str] | None = None
        last_reason = "no backend answered"
        for attempt in range(self.config.max_tries):
            if attempt:
                wait = min(
                    delays[attempt - 1], t_start + self.config.request_timeout - time.monotonic()
                )
                if wait <= 0:
                    break
                self.metrics.retries.inc()
                await self.sleep(wait)
            b = await self.acquire(info, exclude)
            t0 = time.monotonic()
            want_ids = stream and b.ringserve and can_failover(body)
            content = raw
            if want_ids and not body.get("return_token_ids"):
                content = json.dumps({**body, "return_token_ids": True}).encode()
            try:
                resp = await self._open(b, path, fwd, content)
            except httpx.HTTPError as e:
                self._failed(b, t0, exclude, isinstance(e, httpx.ConnectError))
                last_reason = f"{b.url}: {type(e).__name__}: {e}"
                continue
            try:
                if resp.status_code >= 500 or not stream or resp.status_code != 200:
                    data = await resp.aread()
            except httpx.HTTPError as e:
                await resp.aclose()
                self._failed(b, t0, exclude)
                last_reason = f"{b.url}: {type(e).__name__} while reading: {e}"
                continue
            ctype = resp.headers.get("content-type", "application/json")
            if resp.status_code >= 500:
                await resp.aclose()
                self._failed(b, t0, exclude)
                last, last_reason = (resp.status_code, data, ctype), f"{b.url}: {resp.status_code}"
                continue
            if resp.status_code == 200 and not stream and not _is_json(data):
                await resp.aclose()
                self._failed(b, t0, exclude)
                last_reason = f"{b.url}: a 200 whose body is not JSON"
                continue
            if resp.status_code != 200 or not stream:
                await resp.aclose()
                self.pool.mark_success(b)  # a 4xx is the request's fault, not the backend's
                self._done(b, True, t0)
                return Response(data, resp.status_code, media_type=ctype)
            events = events_of(resp)
            try:
                first = await events.__anext__()
            except (httpx.HTTPError, StopAsyncIteration) as e:
                await resp.aclose()
                self._failed(b, t0, exclude, isinstance(e, httpx.HTTPError))
                last_reason = f"{b.url}: the stream ended before its first event"
                continue
            state = StreamState(body, chat, bool(body.get("return_token_ids")))
            relay = Relay(self, path, fwd, info, state).run(b, resp, events, first, t0)
            return StreamingResponse(relay, media_type="text/event-stream", headers=_SSE_HEADERS)
        if last is not None:
            return Response(last[1], last[0], media_type=last[2])
        raise RouterError(f"Every try failed; the last: {last_reason}.", 502)

    def _session(self, headers: dict[str, str], body: Any) -> str | None:
        key = self.config.session_key
        v = headers.get(key.lower())
        if v is None and isinstance(body, dict):
            v = body.get(key)
        return None if v is None else str(v)


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True
