"""The router's ASGI app: the OpenAI routes, /v1/models (the union), /health, /metrics,
POST /admin/weights, behind API-key auth and the per-key rate limit."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Callable

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from router.admission import RateLimiter
from router.backends import BackendPool
from router.canary import CanaryMonitor
from router.config import RouterConfig
from router.metrics import CONTENT_TYPE, RouterMetrics
from router.proxy import Proxy, RouterError, error_body, json_response
from router.routing import make_policy

logger = logging.getLogger("ringserve.router")


class Router:
    """Everything one router process holds (none of it must survive a restart)."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.pool = BackendPool(config, self.metrics)
        self.policy = make_policy(config.routing_logic, config)
        self.pool.on_remove.append(self.policy.forget)
        self.canary = CanaryMonitor(
            config.canary_window,
            config.canary_min_requests,
            config.canary_error_margin,
            config.canary_latency_ratio,
        )
        self.proxy = Proxy(config, self.pool, self.policy, self.metrics, self.canary)
        self.limiter = RateLimiter(config.rate_limit, config.rate_burst)
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await self.pool.start()
        self._tasks.append(asyncio.create_task(self._canary_loop()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pool.stop()
        await self.proxy.close()

    async def _canary_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self.canary.check(list(self.pool.backends.values())):
                self.pool.notify()


def _endpoint(fn: Callable) -> Callable:
    async def handler(request: Request) -> Response:
        try:
            return await fn(request, request.app.state.router)
        except RouterError as e:
            return e.response()
        except Exception as e:
            logger.exception("internal error in %s", request.url.path)
            return json_response(error_body(f"Internal router error: {e}", 500), 500)

    return handler


async def _forward(request: Request, r: Router) -> Response:
    headers = {k.decode().lower(): v.decode() for k, v in request.scope["headers"]}
    wait = r.limiter.retry_after(headers.get("authorization", ""))
    if wait:
        raise RouterError(
            "Rate limit exceeded for this API key. Retry later.", 429, {"Retry-After": str(wait)}
        )
    return await r.proxy.handle(request.url.path, await request.body(), headers)


@_endpoint
async def completions(request: Request, r: Router) -> Response:
    return await _forward(request, r)


@_endpoint
async def models(request: Request, r: Router) -> Response:
    """The union of the healthy backends' models, each listed once."""
    headers = r.config.backend_headers()
    auth = request.headers.get("authorization")
    if not headers and auth:
        headers = {"authorization": auth}

    async def one(url: str) -> list:
        try:
            resp = await r.proxy.client.get(f"{url}/v1/models", headers=headers, timeout=5.0)
            return resp.json().get("data", []) if resp.status_code == 200 else []
        except (httpx.HTTPError, ValueError, AttributeError):
            return []

    urls = [b.url for b in r.pool.available()]
    seen: dict[str, dict] = {}
    for cards in await asyncio.gather(*(one(u) for u in urls)):
        for card in cards:
            if isinstance(card, dict) and card.get("id") not in seen:
                seen[card.get("id")] = card
    return json_response({"object": "list", "data": list(seen.values())})


async def health(request: Request) -> Response:
    return Response(status_code=200)


@_endpoint
async def metrics(request: Request, r: Router) -> Response:
    r.pool.update_gauges()
    return Response(r.metrics.render(), media_type=CONTENT_TYPE)


@_endpoint
async def admin_weights(request: Request, r: Router) -> Response:
    """POST {"weights": {URL: WEIGHT, ...}}: change weights now; GET-like answer either way."""
    try:
        body = await request.json()
    except ValueError:
        raise RouterError("The request body is not valid JSON.", 400) from None
    weights = body.get("weights") if isinstance(body, dict) else None
    if not isinstance(weights, dict):
        raise RouterError('Expected {"weights": {"URL": WEIGHT, ...}}.', 400)
    for url, w in weights.items():
        b = r.pool.backends.get(str(url).rstrip("/"))
        if b is None:
            raise RouterError(f"No backend {url!r}.", 404)
        if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
            raise RouterError(f"Weight for {url!r} must be a non-negative number, got {w!r}.", 400)
    for url, w in weights.items():
        r.pool.backends[str(url).rstrip("/")].weight = float(w)
    if any(b.group == "canary" and b.weight > 0 for b in r.pool.backends.values()):
        r.canary.rolled_back = None
    r.pool.notify()
    return json_response(state_of(r))


def state_of(r: Router) -> dict:
    now = time.monotonic()
    return {
        "backends": [
            {
                "url": b.url,
                "weight": b.weight,
                "group": b.group,
                "healthy": b.healthy,
                "in_flight": b.in_flight,
                "circuit": b.circuit.state,
                "ringserve": b.ringserve,
                "load": b.load,  # the last scrape's gauges
                "scraped_s_ago": round(now - b.scraped_at, 3) if b.scraped_at > 0 else None,
            }
            for b in r.pool.backends.values()
        ],
        "canary_rolled_back": r.canary.rolled_back,
    }


@_endpoint
async def admin_state(request: Request, r: Router) -> Response:
    return json_response(state_of(r))


class Guard:
    """Pure ASGI: --api-key on all but /health; --admin-key (only) on /admin/*."""

    def __init__(self, app: Callable, api_key: str | None, admin_key: str | None) -> None:
        self.app = app
        self.api_key = None if api_key is None else f"Bearer {api_key}".encode()
        self.admin_key = None if admin_key is None else f"Bearer {admin_key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if scope["path"].startswith("/admin/"):
            if self.admin_key is None:
                err = RouterError("The admin API is disabled: start with --admin-key.", 403)
                return await err.response()(scope, receive, send)
            if not hmac.compare_digest(given, self.admin_key):
                err = RouterError("Invalid or missing admin key.", 401)
                return await err.response()(scope, receive, send)
        elif self.api_key is not None and not hmac.compare_digest(given, self.api_key):
            err = RouterError(
                "Invalid or missing API key in the Authorization header.",
                401,
                {"WWW-Authenticate": "Bearer"},
            )
            return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"Not found: {request.url.path}", 405: "Method not allowed."}.get(
        exc.status_code, str(exc.detail)
    )
    return json_response(error_body(message, exc.status_code), exc.status_code)


def build_app(config: RouterConfig) -> tuple[Callable, Router]:
    router = Router(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/admin/weights", admin_weights, methods=["POST"]),
        Route("/admin/state", admin_state, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, exception_handlers={HTTPException: _http_error}, lifespan=lifespan
    )
    app.state.router = router
    return Guard(app, config.api_key, config.admin_key), router
