"""A small OpenAI-shaped HTTP server for the router's tests, which can misbehave on demand.

`python tests/router/fake_backend.py --host H --port P --name NAME`. Its "model" is a counter:
the completion of a prompt of k words is " w{k}", " w{k+1}", ... so a text continuation
(prompt + text so far) goes on exactly where an interrupted one stopped. POST /_control sets
the mode: ok, 500, 503, 400, hang, garbage, exit_after (os._exit after `after` pieces),
exit_before_usage (after the last piece), and health (the /health status), waiting (the
scraped vllm:num_requests_waiting), delay (seconds between chunks). GET /_stats counts the
requests it got."""

from __future__ import annotations

import argparse
import asyncio
import json
import os

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

STATE = {"mode": "ok", "health": 200, "waiting": 0.0, "delay": 0.0, "after": 2, "hits": 0}
NAME = "fake"


def words(body: dict) -> list[str]:
    if "messages" in body:
        return " ".join(str(m.get("content") or "") for m in body["messages"]).split()
    return str(body.get("prompt", "")).split()


def prompts(body: dict) -> list[dict]:
    """One body per prompt of a list (completions), as numbered choices need."""
    p = body.get("prompt")
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return [{**body, "prompt": x} for x in p]
    return [body]


async def generate(request: Request) -> Response:
    STATE["hits"] += 1
    mode = STATE["mode"]
    if mode == "hang":
        await asyncio.sleep(3600)
    if mode == "garbage":
        return Response(b"\x00\x01 this is not json", 200, media_type="application/json")
    if mode in ("500", "503"):
        err = {"error": {"message": f"{NAME} failed", "type": "server_error", "code": int(mode)}}
        return JSONResponse(err, int(mode))
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError:
        err = {"error": {"message": "bad json", "type": "invalid_request_error", "code": 400}}
        return JSONResponse(err, 400)
    if mode == "400" or body.get("max_tokens", 16) < 1:
        err = {"error": {"message": "Invalid max_tokens.", "type": "invalid_request_error",
                         "param": "max_tokens", "code": 400}}  # fmt: skip
        return JSONResponse(err, 400)
    chat = "messages" in body
    k = len(words(body))
    n = body.get("max_tokens", 16)
    pieces = [f" w{k + i}" for i in range(n)]
    base = {"id": f"{NAME}-1", "created": 1, "model": "fake-model", "backend": NAME}
    if not body.get("stream"):
        text = "".join(pieces)
        c = {"index": 0, "finish_reason": "length"}
        c.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return JSONResponse({**base, "object": "text_completion", "choices": [c]})

    # Streams: choice j of prompt i is index i * n_choices + j (as vLLM numbers them), each
    # counting on from its own prompt's words; usage when asked; exit_after: os._exit after
    # `after` pieces of every choice; exit_before_usage: after the last piece.
    groups = [len(words(b)) for b in prompts(body)]
    per = body.get("n") or 1

    async def events():
        for i in range(n):
            if mode == "exit_after" and i == STATE["after"]:
                os._exit(1)
            for g, kg in enumerate(groups):
                for j in range(per):
                    c = {"index": g * per + j, "finish_reason": "length" if i == n - 1 else None}
                    p = f" w{kg + i}"
                    c.update({"delta": {"content": p}} if chat else {"text": p})
                    yield f"data: {json.dumps({**base, 'choices': [c]})}\n\n".encode()
            await asyncio.sleep(STATE["delay"])
        if mode == "exit_before_usage":
            os._exit(1)
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": sum(groups), "completion_tokens": n * per * len(groups)}
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def tokenize(request: Request) -> Response:
    body = await request.json()
    return JSONResponse({"count": len(words(body))})


async def health(request: Request) -> Response:
    return Response(status_code=STATE["health"])


async def metrics(request: Request) -> Response:
    w = STATE["waiting"]
    return PlainTextResponse(f'vllm:num_requests_waiting{{model_name="fake"}} {w}\n')


async def models(request: Request) -> Response:
    card = {"id": f"model-{NAME}", "object": "model", "owned_by": "fake"}
    return JSONResponse({"object": "list", "data": [card]})


async def control(request: Request) -> Response:
    STATE.update(await request.json())
    return JSONResponse(STATE)


async def stats(request: Request) -> Response:
    return JSONResponse(STATE)


def main() -> None:
    global NAME
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="fake")
    ns = p.parse_args()
    NAME = ns.name
    app = Starlette(
        routes=[
            Route("/v1/completions", generate, methods=["POST"]),
            Route("/v1/chat/completions", generate, methods=["POST"]),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/v1/models", models),
            Route("/_control", control, methods=["POST"]),
            Route("/_stats", stats),
        ]
    )
    uvicorn.run(app, host=ns.host, port=ns.port, log_level="warning")


if __name__ == "__main__":
    main()
