"""The OpenAI-compatible HTTP server: starlette routes, SSE streaming, and guard middleware."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from engine_core.protocol import SamplingParams
from engine_core.structured_output.manager import GRAMMAR_ERROR_MARK
from frontend.async_llm import AsyncLLM, EngineDeadError, RequestFailedError
from frontend.cli import ServerArgs
from frontend.metrics import CONTENT_TYPE, Metrics
from frontend.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    RequestError,
    TokenizeRequest,
    chat_body,
    chat_logprobs,
    chat_messages,
    check_chat_unsupported,
    check_token_ids,
    choice,
    completion_body,
    completion_logprobs,
    completion_prompts,
    error_body,
    now,
    parse_request,
    random_id,
    sampling_params,
    token_namer,
    usage,
)
from frontend.outputs import CompletionOutput, RequestOutputKind
from frontend.structured import request_spec
from frontend.tool_output import ChoiceTools
from frontend.tool_parsers import ToolParser, get_parser
from frontend.tools import ToolSetup, tool_setup

logger = logging.getLogger("ringserve.frontend")
access_logger = logging.getLogger("ringserve.access")

VERSION = "0.1.0"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = b"data: [DONE]\n\n"
_FAILED = (EngineDeadError, RequestFailedError)
_OFFLOAD_CHARS = 32_768
_TOKENIZE_POOL = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")


@dataclass
class ServerState:
    """What every handler needs: the engine, the server's settings, the metrics."""

    engine: AsyncLLM
    args: ServerArgs
    model_name: str
    model_root: str
    metrics: Metrics
    created: int = field(default_factory=now)
    draining: bool = False

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise RequestError(f"The model `{name}` does not exist.", 404, param="model")

    def check_accepting(self, num_new: int = 0) -> None:
        """503 while draining, with a dead engine, or with the waiting queue full."""
        if self.draining:
            raise RequestError("The server is shutting down.", 503)
        if self.engine.dead_reason is not None:
            raise RequestError(f"The engine is not running: {self.engine.dead_reason}.", 503)
        limit = self.args.max_queue_len
        if limit is not None and num_new and self.engine.num_waiting(num_new) > limit:
            raise RequestError(
                f"The server is overloaded: more than {limit} requests would wait. Retry later.",
                503,
                headers={"Retry-After": "1"},
            )

    def sampling_params(self, req: Any, prompt_len: int) -> SamplingParams:
        e = self.engine
        return sampling_params(
            req, prompt_len, e.max_model_len, e.vocab_size, self.args.max_logprobs
        )


# ---------------------------------------------------------------- middleware


class AccessLog:
    """Pure ASGI: one log line per request with status, tokens and latency."""

    def __init__(self, app: Callable, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not self.enabled:
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        state = scope.setdefault("state", {})
        status = 500

        async def send_logged(message: dict) -> None:
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

    def __init__(self, app: Callable, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = None if api_key is None else f"Bearer {api_key}".encode()
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
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

    async def _read_body(self, headers: dict, receive: Callable) -> bytes | None:
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


def _replay(body: bytes, receive: Callable) -> Callable:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: waits for the disconnect

    return replay


async def _send_error(send: Callable, err: RequestError, headers: dict[str, str]) -> None:
    body = msgspec.json.encode(err.body())
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- helpers


class SSEResponse(StreamingResponse):
    """Server-sent events; the stream is closed (its requests aborted) however it ends."""

    media_type = "text/event-stream"

    async def stream_response(self, send: Callable) -> None:
        async with contextlib.aclosing(self.body_iterator):
            await super().stream_response(send)


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(obj), status, headers, media_type="application/json")


def _error(err: RequestError) -> Response:
    return _json(err.body(), err.status, err.headers)


def _sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


def _endpoint(fn: Callable[[Request, ServerState], Awaitable[Response]]) -> Callable:
    """A route: RequestError becomes its OpenAI-shaped error; anything else a logged 500."""

    @functools.wraps(fn)
    async def handler(request: Request) -> Response:
        try:
            return await fn(request, request.app.state.server)
        except RequestError as e:
            return _error(e)
        except _FAILED as e:
            return _error(RequestError(str(e), _failed_status(e)))
        except Exception as e:
            logger.exception("internal error in %s", request.url.path)
            return _error(RequestError(f"Internal server error: {type(e).__name__}: {e}", 500))

    return handler


def _failed_status(e: Exception) -> int:
    # The request's own grammar (too slow to compile) is the client's to fix: a 400, so that
    # clients do not retry it as they retry a 5xx.
    if isinstance(e, RequestFailedError) and GRAMMAR_ERROR_MARK in str(e):
        return 400
    return 500


async def _wait_disconnect(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@dataclass
class _Job:
    """One API call's generation: its prompts, their params, and the shape of its choices."""

    chat: bool
    rid: str
    n: int
    inputs: list[tuple[str | None, list[int]]]  # (text or None, token ids) per prompt
    params: list[SamplingParams]
    echo: bool = False
    include_usage: bool = False
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids
    return_token_ids: bool = False  # each choice carries its new `token_ids`
    tools: ToolSetup | None = None  # chat with tools: choices carry tool_calls
    tool_parser: ToolParser | None = None
    created: int = field(default_factory=now)  # one timestamp for the response and its chunks

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(ids) for _, ids in self.inputs)

    def generate(self, st: ServerState, kind: RequestOutputKind) -> AsyncIterator:
        many = len(self.inputs) > 1
        reqs = [
            (text, ids, p, f"{self.rid}-{i}" if many else self.rid)
            for i, ((text, ids), p) in enumerate(zip(self.inputs, self.params, strict=True))
        ]
        return st.engine.generate_many(reqs, kind)

    def echo_text(self, st: ServerState, i: int) -> str:
        if not self.echo:
            return ""
        text, ids = self.inputs[i]
        return text if text is not None else st.engine.tokenizer.decode(ids)

    def logprobs(self, st: ServerState, i: int, c: CompletionOutput, offset: int) -> dict | None:
        k = self.params[i].logprobs
        if k is None:
            return None
        name = token_namer(st.engine.tokenizer.decode, self.tokens_as_ids)
        if self.chat:
            return chat_logprobs(c.token_ids, c.logprobs or [], name, k)
        return completion_logprobs(c.token_ids, c.logprobs or [], name, offset, k)

    def tool_view(self) -> ChoiceTools | None:
        if self.tools is None or self.tools.mode == "none":
            return None
        return ChoiceTools(self.tools, self.tool_parser)

    def body(self, st: ServerState, choices: list, usage_: dict | None, chunk: bool) -> dict:
        make = chat_body if self.chat else completion_body
        return make(self.rid, self.created, st.model_name, choices, usage_, chunk)


async def _run(request: Request, st: ServerState, job: _Job, stream: bool) -> Response:
    request.state.prompt_tokens = job.num_prompt_tokens
    if stream:
        return SSEResponse(_stream(request, st, job), headers=_SSE_HEADERS)
    return await _respond(request, st, job)


async def _respond(request: Request, st: ServerState, job: _Job) -> Response:
    """Run a job to its end and answer with one JSON body; a client that leaves aborts it."""
    finals: list = [None] * len(job.inputs)

    async def run() -> None:
        async with contextlib.aclosing(job.generate(st, RequestOutputKind.FINAL_ONLY)) as merged:
            async for i, out in merged:
                finals[i] = out

    work = asyncio.ensure_future(run())
    gone = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise RequestError("The client disconnected.", 499)
        work.result()
    finally:
        for t in (work, gone):
            t.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)
    choices, num_tokens = [], 0
    for i, out in enumerate(finals):
        prefix = job.echo_text(st, i)
        for c in out.outputs:
            num_tokens += len(c.token_ids)
            lps = job.logprobs(st, i, c, len(prefix))
            choices.append(choice(job.chat, i * job.n + c.index, prefix + c.text, lps, c, False))
            if job.return_token_ids:
                choices[-1]["token_ids"] = list(c.token_ids)
            view = job.tool_view()
            if view is not None:
                msg, reason = view.message(c.text, c.finish_reason)
                choices[-1]["message"], choices[-1]["finish_reason"] = msg, reason
    request.state.output_tokens = num_tokens
    return _json(job.body(st, choices, usage(job.num_prompt_tokens, num_tokens), False))


async def _stream(request: Request, st: ServerState, job: _Job) -> AsyncIterator[bytes]:
    """The job's server-sent events: a chunk per new text, then usage if asked, then [DONE]."""
    offsets: dict[int, int] = {}  # per choice: characters sent so far (logprobs' text_offset)
    views: dict[int, ChoiceTools | None] = {}  # per choice: its tool calls, with tools
    num_tokens = 0
    try:
        if job.chat:  # the first chunk of each choice carries the role, as OpenAI's do
            for index in range(job.n):
                delta = {"role": "assistant", "content": ""}
                first = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
                yield _sse(job.body(st, [first], None, True))
        async with contextlib.aclosing(job.generate(st, RequestOutputKind.DELTA)) as merged:
            async for i, out in merged:
                for c in out.outputs:
                    index = i * job.n + c.index
                    text = c.text
                    if index not in offsets:
                        prefix = job.echo_text(st, i)
                        offsets[index], text = len(prefix), prefix + text
                    num_tokens += len(c.token_ids)
                    lps = job.logprobs(st, i, c, offsets[index]) if c.token_ids else None
                    offsets[index] += len(c.text)
                    view = views.setdefault(index, job.tool_view())
                    if view is not None:
                        for chunk in _tool_chunks(view, index, text, lps, c):
                            yield _sse(job.body(st, [chunk], None, True))
                        continue
                    ids = job.return_token_ids and c.token_ids
                    if not text and lps is None and c.finish_reason is None and not ids:
                        continue  # text held back (a partial character or stop string)
                    chunk = choice(job.chat, index, text, lps, c, True)
                    if job.return_token_ids:
                        chunk["token_ids"] = list(c.token_ids)
                    yield _sse(job.body(st, [chunk], None, True))
                request.state.output_tokens = num_tokens
        if job.include_usage:
            yield _sse(job.body(st, [], usage(job.num_prompt_tokens, num_tokens), True))
    except _FAILED as e:
        yield _sse(error_body(str(e), _failed_status(e)))
    yield _DONE


def _tool_chunks(
    view: ChoiceTools, index: int, text: str, lps: dict | None, c: CompletionOutput
) -> list:
    """A choice's stream chunks under tools: content, then one chunk per tool_calls entry
    (a call's name, then its argument fragments, as OpenAI streams them)."""
    final = c.finish_reason is not None
    delta = view.delta(text, final)
    base = {"index": index, "logprobs": None, "finish_reason": None, "stop_reason": None}
    chunks = []
    if "content" in delta:
        chunks.append({**base, "delta": {"content": delta["content"]}})
    for call in delta.get("tool_calls", ()):
        chunks.append({**base, "delta": {"tool_calls": [call]}})
    if final or (lps is not None and not chunks):
        chunks.append({**base, "delta": {}})
    if chunks:
        chunks[-1]["logprobs"] = lps
    if final:
        chunks[-1]["finish_reason"] = view.finish_reason(c.finish_reason)
        chunks[-1]["stop_reason"] = c.stop_reason
    return chunks


async def _encode(st: ServerState, text: str, add_special: bool) -> list[int]:
    encode = functools.partial(st.engine.tokenizer.encode, text, add_special_tokens=add_special)
    if len(text) < _OFFLOAD_CHARS:
        return encode()
    # Megabytes of text take seconds to tokenize: off the loop, one at a time.
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZE_POOL, encode)


async def _tokenize_prompt(st: ServerState, prompt: str | list[int], add_special: bool) -> tuple:
    if isinstance(prompt, str):
        return prompt, await _encode(st, prompt, add_special)
    check_token_ids(prompt, st.engine.vocab_size)
    return None, prompt


def _apply_chat_template(
    st: ServerState, messages: list, req: Any, tools: list | None = None
) -> str:
    try:
        return st.engine.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            continue_final_message=req.continue_final_message,
            **(req.chat_template_kwargs or {}),
        )
    except Exception as e:  # jinja2 errors, a template that raises on bad roles
        raise RequestError(f"The chat template failed: {e}", param="messages") from None


def _include_usage(req: Any) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


@_endpoint
async def create_completion(request: Request, st: ServerState) -> Response:
    req = parse_request(await request.body(), CompletionRequest)
    st.check_model(req.model)
    st.check_accepting()
    inputs = [
        await _tokenize_prompt(st, p, req.add_special_tokens) for p in completion_prompts(req)
    ]
    if req.continuation_token_ids:
        if len(inputs) != 1:
            raise RequestError("`continuation_token_ids` needs one prompt.", param="prompt")
        check_token_ids(req.continuation_token_ids, st.engine.vocab_size, "continuation_token_ids")
        inputs = [(None, inputs[0][1] + req.continuation_token_ids)]
    params = [st.sampling_params(req, len(ids)) for _, ids in inputs]
    spec = await request_spec(req)
    if spec is not None:
        params = [msgspec.structs.replace(p, structured_outputs=spec) for p in params]
    st.check_accepting(len(inputs) * req.n)
    job = _Job(False, random_id("cmpl"), req.n, inputs, params, req.echo, _include_usage(req))
    job.tokens_as_ids = req.return_tokens_as_token_ids
    job.return_token_ids = req.return_token_ids
    return await _run(request, st, job, req.stream)


@_endpoint
async def create_chat_completion(request: Request, st: ServerState) -> Response:
    req = parse_request(await request.body(), ChatCompletionRequest)
    st.check_model(req.model)
    st.check_accepting()
    check_chat_unsupported(req)
    args = st.args
    tools = tool_setup(
        req.tools, req.tool_choice, req.parallel_tool_calls, args.enable_auto_tool_choice
    )
    messages = chat_messages(req.messages)
    spec = await request_spec(req, tools)
    prompt = _apply_chat_template(st, messages, req, tools.tools if tools else None)
    ids = await _encode(st, prompt, add_special=False)
    if req.continuation_token_ids:
        check_token_ids(req.continuation_token_ids, st.engine.vocab_size, "continuation_token_ids")
        ids = ids + req.continuation_token_ids
    params = st.sampling_params(req, len(ids))
    if spec is not None:
        params = msgspec.structs.replace(params, structured_outputs=spec)
    st.check_accepting(req.n)
    job = _Job(True, random_id("chatcmpl"), req.n, [(prompt, ids)], [params])
    job.tools = tools
    if tools is not None and tools.mode == "auto":
        job.tool_parser = get_parser(args.tool_call_parser)
    job.include_usage = _include_usage(req)
    job.tokens_as_ids = req.return_tokens_as_token_ids
    job.return_token_ids = req.return_token_ids
    return await _run(request, st, job, req.stream)


# ---------------------------------------------------------------- the other endpoints


@_endpoint
async def list_models(request: Request, st: ServerState) -> Response:
    card = {
        "id": st.model_name,
        "object": "model",
        "created": st.created,
        "owned_by": "ringserve",
        "root": st.model_root,
        "parent": None,
        "max_model_len": st.engine.max_model_len,
    }
    return _json({"object": "list", "data": [card]})


@_endpoint
async def health(request: Request, st: ServerState) -> Response:
    if st.draining:
        raise RequestError("The server is shutting down.", 503)
    if not await st.engine.check_health():
        reason = st.engine.dead_reason or "the engine core did not answer"
        raise RequestError(f"The engine is not healthy: {reason}.", 503)
    return Response(status_code=200)


@_endpoint
async def metrics(request: Request, st: ServerState) -> Response:
    # A ping's answer carries fresh scheduler stats: the gauges are current, also when idle.
    await st.engine.check_health(timeout=1.0)
    return Response(st.metrics.render(), media_type=CONTENT_TYPE)


@_endpoint
async def tokenize(request: Request, st: ServerState) -> Response:
    req = parse_request(await request.body(), TokenizeRequest)
    st.check_model(req.model)
    tok = st.engine.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise RequestError("Give exactly one of `prompt` and `messages`.", param="prompt")
    if req.messages is not None:
        text = _apply_chat_template(st, chat_messages(req.messages), req)
        ids = await _encode(st, text, add_special=False)
    else:
        ids = await _encode(st, req.prompt, req.add_special_tokens)
    body: dict[str, Any] = {
        "count": len(ids),
        "max_model_len": st.engine.max_model_len,
        "tokens": ids,
    }
    if req.return_token_strs:
        body["token_strs"] = tok.convert_ids_to_tokens(ids)
    return _json(body)


@_endpoint
async def detokenize(request: Request, st: ServerState) -> Response:
    req = parse_request(await request.body(), DetokenizeRequest)
    st.check_model(req.model)
    check_token_ids(req.tokens, st.engine.vocab_size, param="tokens")
    return _json({"prompt": st.engine.tokenizer.decode(req.tokens)})


async def version(request: Request) -> Response:
    return _json({"version": VERSION})


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"Not found: {request.url.path}", 405: "Method not allowed."}.get(
        exc.status_code, str(exc.detail)
    )
    return _json(error_body(message, exc.status_code), exc.status_code, exc.headers)


def build_app(engine: AsyncLLM, args: ServerArgs, model_name: str, model_root: str) -> Callable:
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
    outer = AccessLog(guarded, args.log_requests)
    outer.state = state  # type: ignore[attr-defined]
    return outer
