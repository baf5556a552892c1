"""The OpenAI API's shared envelope: errors, request parsing, the fields every sampling request
has, ids, usage, and the response body and choice every endpoint answers with.

The endpoints' own shapes live beside it: `openai_completions` (/v1/completions),
`openai_chat` (/v1/chat/completions, /tokenize's messages) and `openai_sampling` (a request's
sampling fields, checked against the model, into the core's SamplingParams).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

from frontend.outputs import CompletionOutput, Logprob

# Logprobs of -inf do not exist in JSON; vLLM and OpenAI clamp them.
MIN_LOGPROB = -9999.0
_PARAM_RE = re.compile(r"at `\$\.?([^`]*)`")

# How logprobs name a token: (token id, the position's logprobs) -> its text.
TokenNamer = Callable[[int, dict[int, Logprob]], str]


class RequestError(Exception):
    """A request the server refuses: becomes an OpenAI-shaped error body with this status."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type or error_type(status)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.param, self.type)


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(
    message: str, status: int, param: str | None = None, type: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object, {"error": {"message", "type", "param", "code"}}; as vLLM's, the
    code is the HTTP status."""
    return {
        "error": {
            "message": message,
            "type": type or error_type(status),
            "param": param,
            "code": status,
        }
    }


# ---------------------------------------------------------------- requests


class StreamOptions(msgspec.Struct):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class OutputAsk(NamedTuple):
    """What a request asks of its output, and the fields that asked it (for errors' `param`):
    completions and chat name max_tokens and logprobs differently."""

    max_tokens: int | None
    max_tokens_param: str
    logprobs: int | None  # top logprobs per token; None: no logprobs
    logprobs_param: str
    prompt_param: str


class SamplingRequest(msgspec.Struct):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False  # logprobs' tokens as "token_id:{id}"
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # ringserve's extensions for the router's exact failover (router/README): each choice
    # carries the `token_ids` it adds; `continuation_token_ids` go after the prompt's tokens.
    return_token_ids: bool = False
    continuation_token_ids: list[int] | None = None
    structured_outputs: dict[str, Any] | None = None  # see frontend.structured
    response_format: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        """A stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


def parse_request(body: bytes, type_: type[msgspec.Struct]) -> Any:
    """Decode a JSON body into `type_`; malformed JSON or a wrong type is a 400 naming the field."""
    if not body:
        raise RequestError("The request body is empty; expected a JSON object.")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as e:
        m = _PARAM_RE.search(str(e))
        param = m.group(1).replace("[...]", "") if m else None  # "[...]": a dict's value
        raise RequestError(f"Invalid request: {e}", param=param or None) from None
    except msgspec.DecodeError as e:
        raise RequestError(f"The request body is not valid JSON: {e}") from None


def check_token_ids(token_ids: list[int], vocab_size: int, param: str = "prompt") -> None:
    """A prompt given as token ids must stay inside the vocabulary."""
    for t in token_ids:
        if not 0 <= t < vocab_size:
            raise RequestError(
                f"Token id {t} in the prompt is outside the vocabulary [0, {vocab_size}).",
                param=param,
            )


# ---------------------------------------------------------------- responses


def random_id(prefix: str) -> str:
    """An OpenAI-like id: cmpl-…, chatcmpl-…."""
    return f"{prefix}-{secrets.token_hex(16)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def clamp_logprob(x: float) -> float:
    return max(float(x), MIN_LOGPROB)


def token_namer(decode_ids: Callable[[list[int]], str], as_ids: bool = False) -> TokenNamer:
    """How logprobs name a token: its text (as the output processor decoded it), or, with
    vLLM's `return_tokens_as_token_ids`, "token_id:{id}"."""
    if as_ids:
        return lambda tid, entry: f"token_id:{tid}"

    def name(tid: int, entry: dict[int, Logprob]) -> str:
        s = getattr(entry.get(tid), "decoded_token", None)
        return s if s is not None else decode_ids([tid])

    return name


def response_body(
    chat: bool,
    rid: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_: dict[str, int] | None,
    chunk: bool,
) -> dict[str, Any]:
    """The envelope every response shares: a text_completion (the same object name streamed
    and not, as OpenAI does), a chat.completion or a chat.completion.chunk; as a stream chunk,
    `usage` only when asked for."""
    if not chat:
        object_ = "text_completion"
    else:
        object_ = "chat.completion.chunk" if chunk else "chat.completion"
    body: dict[str, Any] = {
        "id": rid,
        "object": object_,
        "created": created,
        "model": model,
        "choices": choices,
        "system_fingerprint": None,
    }
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def choice(
    chat: bool,
    index: int,
    text: str,
    logprobs: dict[str, Any] | None,
    c: CompletionOutput,
    chunk: bool,
) -> dict[str, Any]:
    """One choice of a response or stream chunk, from a CompletionOutput `c`: completions
    carry `text`, chat a `message` (or, streamed, a `delta`)."""
    out: dict[str, Any] = {"index": index}
    if not chat:
        out["text"] = text
    elif chunk:
        out["delta"] = {"content": text} if text else {}
    else:
        out["message"] = {"role": "assistant", "content": text}
    out["logprobs"] = logprobs
    out["finish_reason"] = c.finish_reason
    out["stop_reason"] = c.stop_reason
    return out
