"""One API call's generation, answered: a `Job` (its prompts, params and the shape of its
choices), run to one JSON body or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Send

from engine_core.protocol import SamplingParams
from frontend.api_state import FAILED, ServerState, failed_status, json_response
from frontend.openai_chat import chat_logprobs
from frontend.openai_completions import completion_logprobs
from frontend.openai_protocol import (
    RequestError,
    choice,
    error_body,
    now,
    response_body,
    token_namer,
    usage,
)
from frontend.outputs import CompletionOutput, RequestOutput, RequestOutputKind
from frontend.tool_output import ChoiceTools
from frontend.tool_parsers import ToolParser
from frontend.tools import ToolSetup

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = b"data: [DONE]\n\n"

Outputs = AsyncGenerator[tuple[int, RequestOutput], None]


@dataclass
class Job:
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

    def generate(self, st: ServerState, kind: RequestOutputKind) -> Outputs:
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

    def logprobs(
        self, st: ServerState, i: int, c: CompletionOutput, offset: int
    ) -> dict[str, Any] | None:
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

    def body(
        self,
        st: ServerState,
        choices: list[dict[str, Any]],
        usage_: dict[str, int] | None,
        chunk: bool,
    ) -> dict[str, Any]:
        return response_body(
            self.chat, self.rid, self.created, st.model_name, choices, usage_, chunk
        )


async def run_job(request: Request, st: ServerState, job: Job, stream: bool) -> Response:
    """Answer with the job's events as they come (`stream`), or with one body at its end."""
    request.state.prompt_tokens = job.num_prompt_tokens
    if stream:
        return SSEResponse(_stream(request, st, job), headers=_SSE_HEADERS)
    return await _respond(request, st, job)


class SSEResponse(StreamingResponse):
    """Server-sent events; the stream is closed (its requests aborted) however it ends."""

    media_type = "text/event-stream"

    def __init__(
        self, events: AsyncGenerator[bytes, None], headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(events, headers=headers)
        self._events = events

    async def stream_response(self, send: Send) -> None:
        async with contextlib.aclosing(self._events):
            await super().stream_response(send)


def _sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _respond(request: Request, st: ServerState, job: Job) -> Response:
    """Run a job to its end and answer with one JSON body; a client that leaves aborts it."""
    finals: list[RequestOutput | None] = [None] * len(job.inputs)

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
    choices: list[dict[str, Any]] = []
    num_tokens = 0
    for i, out in enumerate(finals):
        assert out is not None, "generate_many ended before a request finished"
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
    return json_response(job.body(st, choices, usage(job.num_prompt_tokens, num_tokens), False))


async def _stream(request: Request, st: ServerState, job: Job) -> AsyncGenerator[bytes, None]:
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
    except FAILED as e:
        yield _sse(error_body(str(e), failed_status(e)))
    yield _DONE


def _tool_chunks(
    view: ChoiceTools, index: int, text: str, lps: dict[str, Any] | None, c: CompletionOutput
) -> list[dict[str, Any]]:
    """A choice's stream chunks under tools: content, then one chunk per tool_calls entry
    (a call's name, then its argument fragments, as OpenAI streams them)."""
    final = c.finish_reason is not None
    delta = view.delta(text, final)
    base: dict[str, Any] = {
        "index": index,
        "logprobs": None,
        "finish_reason": None,
        "stop_reason": None,
    }
    chunks: list[dict[str, Any]] = []
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
