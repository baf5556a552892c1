"""The OpenAI-compatible HTTP server as served: the ASGI app (starlette routes to the
endpoints) behind pure-ASGI guards (API key, body size) and the access log."""

from __future__ import annotations

import hmac
import logging
import time

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from frontend.api_endpoints import (
    create_chat_completion,
    create_completion,
    detokenize,
    health,
    list_models,
    metrics,
    tokenize,
    version,
)
from frontend.api_state import ServerState, json_response
from frontend.async_llm import AsyncLLM
from frontend.cli import ServerArgs
from frontend.metrics import Metrics
from frontend.openai_protocol import RequestError, error_body

access_logger = logging.getLogger("ringserve.access")


class ServerApp:
    """The ASGI application as served, and the state its endpoints share (the server's
    `__main__` drains through it)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def build_app(engine: AsyncLLM, args: ServerArgs, model_name: str, model_root: str) -> ServerApp:
    """The ASGI application: routes behind the access log, auth and body-size guards."""
    state = ServerState(
        engine, args, model_name, model_root, Metrics(model_name, engine.max_model_len)
    )
    engine.metrics = state.metrics
    routes = [
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/version", version, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.state.server = state
    guarded = Guard(app, args.api_key, args.max_request_body_bytes)
    return ServerApp(AccessLog(guarded, args.log_requests), state)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # registered for HTTPException only
    message = {404: f"Not found: {request.url.path}", 405: "Method not allowed."}.get(
        exc.status_code, str(exc.detail)
    )
    return json_response(error_body(message, exc.status_code), exc.status_code, exc.headers)


class AccessLog:
    """Pure ASGI: one log line per request with status, tokens and latency."""

    def __init__(self, app: ASGIApp, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.enabled:
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        state = scope.setdefault("state", {})
        status = 500

        async def send_logged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            client = scope.get("client") or ("-", 0)
            access_logger.info(
                '%s:%s "%s %s" %d prompt_tokens=%s output_tokens=%s latency=%.3fs',
                client[0],
                client[1],
                scope["method"],
                scope["path"],
                status,
                state.get("prompt_tokens", 0),
                state.get("output_tokens", 0),
                time.monotonic() - t0,
            )


class Guard:
    """Pure ASGI: API-key check (all but /health) and a request body size limit (413)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = None if api_key is None else f"Bearer {api_key}".encode()
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.api_key):
                err = RequestError("Invalid or missing API key in the Authorization header.", 401)
                return await _send_error(send, err, {"WWW-Authenticate": "Bearer"})
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(headers, receive)
            if body is None:
                err = RequestError(
                    f"The request body is larger than the limit of {self.max_body_bytes} bytes.",
                    413,
                )
                return await _send_error(send, err, {"Connection": "close"})
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes | None:
        """The whole body, or None when it is over the limit (the rest is read and dropped,
        so that the client gets to read the 413 instead of a reset connection)."""
        length = headers.get(b"content-length")
        too_big = length is not None and length.isdigit() and int(length) > self.max_body_bytes
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                too_big = True
            if not too_big:
                chunks.append(chunk)
            elif size > 16 * self.max_body_bytes:
                break  # do not drain without bound
        return None if too_big else b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: waits for the disconnect

    return replay


async def _send_error(send: Send, err: RequestError, headers: dict[str, str]) -> None:
    body = msgspec.json.encode(err.body())
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
