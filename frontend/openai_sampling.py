"""A request's sampling fields, checked against the model, into the core's SamplingParams:
n, lengths against the context, logprobs, stop strings and ids, logit bias."""

from __future__ import annotations

from typing import Any

from engine_core.protocol import SamplingParams
from frontend.openai_chat import ChatCompletionRequest
from frontend.openai_completions import CompletionRequest
from frontend.openai_protocol import RequestError

_MAX_N = 128
# Optional fields passed on as they are when given (the core's defaults otherwise).
_PASSED_ON = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


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
    ask = req.output_ask()
    logprobs = ask.logprobs
    if logprobs is not None and not 0 <= logprobs <= max_logprobs:
        raise RequestError(
            f"{ask.logprobs_param} must be in [0, {max_logprobs}], got {logprobs}.",
            param=ask.logprobs_param,
        )
    _check_length(prompt_len, ask.max_tokens, max_model_len, ask.max_tokens_param, ask.prompt_param)
    max_tokens = ask.max_tokens if ask.max_tokens is not None else max_model_len - prompt_len
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
    for name in _PASSED_ON:
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = value
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        msg = str(e)
        field = msg.split(" ", 1)[0]
        param = {"max_tokens": ask.max_tokens_param, "logprobs": ask.logprobs_param}.get(
            field, field
        )
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
