"""The offline APIs' prompts (LLM and the embeddable AsyncLLM): tokenized, then checked
against the model before anything reaches the core; what is wrong raises ValueError naming it."""

from __future__ import annotations

from typing import Any

from engine_core.protocol import SamplingParams

PromptType = str | dict[str, Any] | list[int]


def prepare_prompt(
    tokenizer: Any, prompt: PromptType, sp: SamplingParams, max_model_len: int, vocab_size: int
) -> tuple[str | None, list[int]]:
    """The prompt's text (None when given as token ids) and token ids, checked with `sp`."""
    text, token_ids = tokenize_prompt(tokenizer, prompt)
    check_prompt(token_ids, sp, max_model_len, vocab_size)
    check_structured_outputs(sp)
    return text, token_ids


def tokenize_prompt(tokenizer: Any, prompt: PromptType) -> tuple[str | None, list[int]]:
    """A string, {"prompt": ...} or {"prompt_token_ids": [...]} (vLLM's prompt dicts), or a
    list of token ids."""
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        if "prompt" in prompt:
            return prompt["prompt"], tokenizer.encode(prompt["prompt"])
        raise ValueError(
            f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}"
        )
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return None, list(prompt)
    raise TypeError(f"unsupported prompt type {type(prompt).__name__}")


def check_prompt(
    token_ids: list[int], sp: SamplingParams, max_model_len: int, vocab_size: int
) -> None:
    """Raise ValueError unless the prompt fits the model with room for max_tokens."""
    if not token_ids:
        raise ValueError("a prompt must have at least one token")
    n = len(token_ids)
    if n >= max_model_len:
        raise ValueError(
            f"the prompt has {n} tokens, but the model's context is {max_model_len} tokens "
            "(and at least one must be left to generate)"
        )
    if sp.max_tokens is not None and n + sp.max_tokens > max_model_len:
        raise ValueError(
            f"the prompt ({n} tokens) plus max_tokens ({sp.max_tokens}) exceeds the model's "
            f"context of {max_model_len} tokens"
        )
    for t in token_ids:
        if not 0 <= t < vocab_size:
            raise ValueError(f"prompt token id {t} is out of the vocabulary (size {vocab_size})")


def check_structured_outputs(sp: SamplingParams) -> None:
    """Raise ValueError naming the bad part of a structured-output spec that does not convert."""
    if sp.structured_outputs is None:
        return
    # Lazy: xgrammar is imported only by a request that asks for structured outputs.
    from frontend.openai_protocol import RequestError
    from frontend.structured import check_sync

    try:
        check_sync(sp.structured_outputs)
    except RequestError as e:
        raise ValueError(f"{e.param}: {e.message}") from None
