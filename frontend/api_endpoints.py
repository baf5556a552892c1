"""The HTTP endpoints: completions, chat completions, models, health, metrics, tokenize,
detokenize and version; each turns a request into a reply through the ServerState."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from frontend.api_generation import Job, run_job
from frontend.api_state import ServerState, endpoint, json_response
from frontend.metrics import CONTENT_TYPE
from frontend.openai_chat import (
    ChatCompletionRequest,
    ChatMessage,
    chat_messages,
    check_chat_unsupported,
)
from frontend.openai_completions import CompletionRequest, completion_prompts
from frontend.openai_protocol import RequestError, check_token_ids, parse_request, random_id
from frontend.structured import request_spec
from frontend.tool_parsers import get_parser
from frontend.tools import tool_setup

VERSION = "0.1.0"
_OFFLOAD_CHARS = 32_768
_TOKENIZE_POOL = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")


class TokenizeRequest(msgspec.Struct):
    """POST /tokenize (vLLM's): a prompt, or chat messages put through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(msgspec.Struct):
    """POST /detokenize (vLLM's)."""

    tokens: list[int]
    model: str | None = None


async def _encode(st: ServerState, text: str, add_special: bool) -> list[int]:
    encode = functools.partial(st.engine.tokenizer.encode, text, add_special_tokens=add_special)
    if len(text) < _OFFLOAD_CHARS:
        return encode()
    # Megabytes of text take seconds to tokenize: off the loop, one at a time.
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZE_POOL, encode)


async def _tokenize_prompt(
    st: ServerState, prompt: str | list[int], add_special: bool
) -> tuple[str | None, list[int]]:
    if isinstance(prompt, str):
        return prompt, await _encode(st, prompt, add_special)
    check_token_ids(prompt, st.engine.vocab_size)
    return None, prompt


def _apply_chat_template(
    st: ServerState,
    messages: list[dict[str, Any]],
    req: ChatCompletionRequest | TokenizeRequest,
    tools: list[Any] | None = None,
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


@endpoint
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
    job = Job(False, random_id("cmpl"), req.n, inputs, params, req.echo, req.include_usage)
    job.tokens_as_ids = req.return_tokens_as_token_ids
    job.return_token_ids = req.return_token_ids
    return await run_job(request, st, job, req.stream)


@endpoint
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
    job = Job(True, random_id("chatcmpl"), req.n, [(prompt, ids)], [params])
    job.tools = tools
    if tools is not None and tools.mode == "auto":
        # tool_setup refuses "auto" without --enable-auto-tool-choice, which needs a parser.
        assert args.tool_call_parser is not None
        job.tool_parser = get_parser(args.tool_call_parser)
    job.include_usage = req.include_usage
    job.tokens_as_ids = req.return_tokens_as_token_ids
    job.return_token_ids = req.return_token_ids
    return await run_job(request, st, job, req.stream)


@endpoint
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
    return json_response({"object": "list", "data": [card]})


@endpoint
async def health(request: Request, st: ServerState) -> Response:
    if st.draining:
        raise RequestError("The server is shutting down.", 503)
    if not await st.engine.check_health():
        reason = st.engine.dead_reason or "the engine core did not answer"
        raise RequestError(f"The engine is not healthy: {reason}.", 503)
    return Response(status_code=200)


@endpoint
async def metrics(request: Request, st: ServerState) -> Response:
    # A ping's answer carries fresh scheduler stats: the gauges are current, also when idle.
    await st.engine.check_health(timeout=1.0)
    return Response(st.metrics.render(), media_type=CONTENT_TYPE)


@endpoint
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
    return json_response(body)


@endpoint
async def detokenize(request: Request, st: ServerState) -> Response:
    req = parse_request(await request.body(), DetokenizeRequest)
    st.check_model(req.model)
    check_token_ids(req.tokens, st.engine.vocab_size, param="tokens")
    return json_response({"prompt": st.engine.tokenizer.decode(req.tokens)})


async def version(request: Request) -> Response:
    return json_response({"version": VERSION})
