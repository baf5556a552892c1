"""POST /v1/completions: the request, its prompts, and its logprobs."""

from __future__ import annotations

from typing import Any

from frontend.openai_protocol import (
    OutputAsk,
    RequestError,
    SamplingRequest,
    TokenNamer,
    clamp_logprob,
)
from frontend.outputs import Logprob


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[Any] | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True

    def output_ask(self) -> OutputAsk:
        """What it asks of its output; a 400 for what this server cannot honour."""
        if self.suffix:
            raise RequestError("`suffix` is not supported.", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("`best_of` must equal `n` (or be left out).", param="best_of")
        if self.echo and self.logprobs is not None:
            raise RequestError(
                "`echo` with `logprobs` needs prompt logprobs, which this server does not compute.",
                param="echo",
            )
        return OutputAsk(self.max_tokens, "max_tokens", self.logprobs, "logprobs", "prompt")


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


def completion_logprobs(
    token_ids: list[int],
    logprobs: list[dict[int, Logprob]],
    decode: TokenNamer,
    text_offset: int,
    top_k: int,
) -> dict[str, list[Any]]:
    """Completions' logprobs: {"tokens", "token_logprobs", "top_logprobs", "text_offset"};
    `decode(token_id, entry)` names a token (see token_namer)."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float]] = []
    offsets: list[int] = []
    for tid, entry in zip(token_ids, logprobs, strict=False):
        tok = decode(tid, entry)
        sampled = entry.get(tid)
        tokens.append(tok)
        token_lps.append(clamp_logprob(sampled.logprob) if sampled is not None else None)
        top: dict[str, float] = {}
        for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank or 0):
            if t == tid or (lp.rank is not None and lp.rank <= top_k):
                top.setdefault(decode(t, entry), clamp_logprob(lp.logprob))
        tops.append(top)
        offsets.append(text_offset)
        text_offset += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }
