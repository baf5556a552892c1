"""The OpenAI API's request and response shapes: msgspec parsing, validation, and JSON builders."""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

import msgspec

from engine_core.protocol import SamplingParams

# Logprobs of -inf do not exist in JSON; vLLM and OpenAI clamp them.
_MIN_LOGPROB = -9999.0
_MAX_N = 128
_PARAM_RE = re.compile(r"at `\$\.?([^`]*)`")


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


class _SamplingRequest(msgspec.Struct):
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


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[Any] | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True


class TextPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this answers


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(msgspec.Struct):
    """POST /tokenize: a prompt, or chat messages put through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(msgspec.Struct):
    """POST /detokenize."""

    tokens: list[int]
    model: str | None = None


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


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request: strings or token-id lists, one per choice group."""
    p = req.prompt
    if p is None:
        raise RequestError("`prompt` is required.", param="prompt")
    if isinstance(p, str):
        return [p]
    if not p:
        raise RequestError("`prompt` must not be an empty list.", param="prompt")
    if all(isinstance(x, str) for x in p):
        return list(p)
    if all(_is_token_id(x) for x in p):
        return [list(p)]
    if all(isinstance(x, list) and x and all(_is_token_id(t) for t in x) for x in p):
        return [list(x) for x in p]
    raise RequestError(
        "`prompt` must be a string, a list of strings, a list of token ids, "
        "or a list of non-empty lists of token ids.",
        param="prompt",
    )


def _is_token_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def chat_messages(
    messages: list[ChatMessage] | None, param: str = "messages"
) -> list[dict[str, str]]:
    """Messages as the chat template wants them: role and plain-text content."""
    if not messages:
        raise RequestError("`messages` must be a non-empty list.", param=param)
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant", "tool"):
            raise RequestError(
                f"messages[{i}].role must be 'system', 'user', 'assistant' or 'tool', "
                f"got {m.role!r}.",
                param=f"{param}[{i}].role",
            )
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise RequestError(
                        f"messages[{i}].content[{j}] must be a text part "
                        f"({{'type': 'text', 'text': ...}}), got type {part.type!r}.",
                        param=f"{param}[{i}].content[{j}]",
                    )
                texts.append(part.text)
            content = "".join(texts)
        elif content is None:
            if role != "assistant":
                raise RequestError(
                    f"messages[{i}].content is required for role {role!r}.",
                    param=f"{param}[{i}].content",
                )
            content = ""
        msg: dict[str, Any] = {"role": role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls is not None:
            if role != "assistant":
                raise RequestError(
                    f"messages[{i}].tool_calls is only for assistant messages.",
                    param=f"{param}[{i}].tool_calls",
                )
            from frontend.tools import template_tool_calls

            msg["tool_calls"] = template_tool_calls(m.tool_calls, f"{param}[{i}].tool_calls")
        if role == "tool":
            if m.tool_call_id is None:
                raise RequestError(
                    f"messages[{i}] (role 'tool') needs `tool_call_id`.",
                    param=f"{param}[{i}].tool_call_id",
                )
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def check_chat_unsupported(req: ChatCompletionRequest) -> None:
    """Refuse what this server cannot honour rather than silently ignore it."""
    # As vLLM: top_logprobs 0 without logprobs asks for nothing, and is accepted.
    if req.top_logprobs and not req.logprobs:
        raise RequestError("`top_logprobs` needs `logprobs` set to true.", param="top_logprobs")


def sampling_params(
    req: CompletionRequest | ChatCompletionRequest,
    prompt_len: int,
    max_model_len: int,
    vocab_size: int,
    max_logprobs: int = 20,
) -> SamplingParams:
    """Validate one request against the model and turn it into the core's SamplingParams."""
    if req.n > _MAX_N:
        raise RequestError(f"n must be at most {_MAX_N}, got {req.n}.", param="n")
    is_chat = isinstance(req, ChatCompletionRequest)
    if is_chat:
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        mt_param = (
            "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        )
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        lp_param = "top_logprobs"
    else:
        max_tokens, mt_param = req.max_tokens, "max_tokens"
        logprobs, lp_param = req.logprobs, "logprobs"
        if req.suffix:
            raise RequestError("`suffix` is not supported.", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise RequestError("`best_of` must equal `n` (or be left out).", param="best_of")
        if req.echo and logprobs is not None:
            raise RequestError(
                "`echo` with `logprobs` needs prompt logprobs, which this server does not compute.",
                param="echo",
            )
    if logprobs is not None and not 0 <= logprobs <= max_logprobs:
        raise RequestError(
            f"{lp_param} must be in [0, {max_logprobs}], got {logprobs}.", param=lp_param
        )
    _check_length(
        prompt_len, max_tokens, max_model_len, mt_param, "messages" if is_chat else "prompt"
    )
    if max_tokens is None:
        max_tokens = max_model_len - prompt_len
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    if stop is not None and any(s == "" for s in stop):
        raise RequestError("`stop` strings must not be empty.", param="stop")
    for tid in req.stop_token_ids or ():
        if not 0 <= tid < vocab_size:
            raise RequestError(
                f"stop_token_ids contains {tid}, outside the vocabulary [0, {vocab_size}).",
                param="stop_token_ids",
            )
    kwargs: dict[str, Any] = dict(
        n=req.n,
        seed=req.seed,
        stop=stop or None,
        stop_token_ids=req.stop_token_ids or None,
        logit_bias=_logit_bias(req.logit_bias, vocab_size),
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
    )
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    ):
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = value
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        msg = str(e)
        field = msg.split(" ", 1)[0]
        param = {"max_tokens": mt_param, "logprobs": lp_param}.get(field, field)
        raise RequestError(msg, param=param if field in kwargs else None) from None


def _check_length(
    prompt_len: int, max_tokens: int | None, max_model_len: int, mt_param: str, prompt_param: str
) -> None:
    if prompt_len == 0:
        raise RequestError(
            "The prompt is empty: it must have at least one token.", param=prompt_param
        )
    if prompt_len >= max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt has {prompt_len} tokens, which leaves no room to generate. Please reduce "
            "the length of the prompt.",
            param=prompt_param,
        )
    if max_tokens is not None and max_tokens >= 1 and prompt_len + max_tokens > max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
            f"{max_tokens} in the completion). Please reduce the length of the prompt or "
            "completion.",
            param=mt_param,
        )


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            tid = int(key)
        except ValueError:
            raise RequestError(
                f"logit_bias keys must be token ids, got {key!r}.", param="logit_bias"
            ) from None
        if not 0 <= tid < vocab_size:
            raise RequestError(
                f"logit_bias token id {tid} is outside the vocabulary [0, {vocab_size}).",
                param="logit_bias",
            )
        out[tid] = value
    return out


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


def _lp(x: float) -> float:
    return max(float(x), _MIN_LOGPROB)


def token_namer(decode_ids, as_ids: bool = False):
    """How logprobs name a token: its text (as the output processor decoded it), or, with
    vLLM's `return_tokens_as_token_ids`, "token_id:{id}"."""
    if as_ids:
        return lambda tid, entry: f"token_id:{tid}"

    def name(tid: int, entry: dict) -> str:
        s = getattr(entry.get(tid), "decoded_token", None)
        return s if s is not None else decode_ids([tid])

    return name


def completion_logprobs(
    token_ids: list[int], logprobs: list[dict], decode, text_offset: int, top_k: int
) -> dict[str, list]:
    """Completions' logprobs: {"tokens", "token_logprobs", "top_logprobs", "text_offset"};
    `decode(token_id, entry)` names a token (see token_namer)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, logprobs, strict=False):
        tok = decode(tid, entry)
        sampled = entry.get(tid)
        tokens.append(tok)
        token_lps.append(_lp(sampled.logprob) if sampled is not None else None)
        top = {}
        for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank or 0):
            if t == tid or (lp.rank is not None and lp.rank <= top_k):
                top.setdefault(decode(t, entry), _lp(lp.logprob))
        tops.append(top)
        offsets.append(text_offset)
        text_offset += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(
    token_ids: list[int], logprobs: list[dict], decode, top_k: int
) -> dict[str, list]:
    """Chat's logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
    content = []
    for tid, entry in zip(token_ids, logprobs, strict=False):
        tok = decode(tid, entry)
        sampled = entry.get(tid)
        ranked = sorted(
            ((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top_k),
            key=lambda kv: kv[1].rank,
        )
        tops = []
        for t, lp in ranked[:top_k]:
            s = decode(t, entry)
            tops.append({"token": s, "logprob": _lp(lp.logprob), "bytes": list(s.encode())})
        content.append(
            {
                "token": tok,
                "logprob": _lp(sampled.logprob) if sampled is not None else _MIN_LOGPROB,
                "bytes": list(tok.encode()),
                "top_logprobs": tops,
            }
        )
    return {"content": content}


def _response_body(
    object_: str,
    rid: str,
    created: int,
    model: str,
    choices: list[dict],
    usage_: dict | None,
    chunk: bool,
) -> dict[str, Any]:
    """The envelope every response shares; as a stream chunk, `usage` only when asked for."""
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


def completion_body(
    rid: str, created: int, model: str, choices: list[dict], usage_: dict | None, chunk: bool
) -> dict[str, Any]:
    """A text_completion object (the same object name streamed and not, as OpenAI does)."""
    return _response_body("text_completion", rid, created, model, choices, usage_, chunk)


def chat_body(
    rid: str, created: int, model: str, choices: list[dict], usage_: dict | None, chunk: bool
) -> dict[str, Any]:
    """A chat.completion object, or a chat.completion.chunk."""
    object_ = "chat.completion.chunk" if chunk else "chat.completion"
    return _response_body(object_, rid, created, model, choices, usage_, chunk)


def choice(chat: bool, index: int, text: str, logprobs: dict | None, c: Any, chunk: bool) -> dict:
    """One choice of a response or stream chunk, from a CompletionOutput `c`."""
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
