"""POST /v1/chat/completions: the request, its messages as the chat template wants them, and
its logprobs."""

from __future__ import annotations

from typing import Any

import msgspec

from frontend.openai_protocol import (
    MIN_LOGPROB,
    OutputAsk,
    RequestError,
    SamplingRequest,
    TokenNamer,
    clamp_logprob,
)
from frontend.outputs import Logprob
from frontend.tools import template_tool_calls


class TextPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this answers


class ChatCompletionRequest(SamplingRequest):
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

    def output_ask(self) -> OutputAsk:
        """What it asks of its output: max_completion_tokens (OpenAI's newer name) wins over
        max_tokens; logprobs are top_logprobs per token, when logprobs is true."""
        max_tokens: int | None
        if self.max_completion_tokens is not None:
            max_tokens, mt_param = self.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, mt_param = self.max_tokens, "max_tokens"
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return OutputAsk(max_tokens, mt_param, logprobs, "top_logprobs", "messages")


def chat_messages(
    messages: list[ChatMessage] | None, param: str = "messages"
) -> list[dict[str, Any]]:
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
        msg: dict[str, Any] = {"role": role, "content": _content(m, i, role, param)}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls is not None:
            if role != "assistant":
                raise RequestError(
                    f"messages[{i}].tool_calls is only for assistant messages.",
                    param=f"{param}[{i}].tool_calls",
                )
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


def _content(m: ChatMessage, i: int, role: str, param: str) -> str:
    """A message's content as one string: text parts joined; none only for the assistant."""
    content = m.content
    if isinstance(content, str):
        return content
    if content is None:
        if role != "assistant":
            raise RequestError(
                f"messages[{i}].content is required for role {role!r}.",
                param=f"{param}[{i}].content",
            )
        return ""
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise RequestError(
                f"messages[{i}].content[{j}] must be a text part "
                f"({{'type': 'text', 'text': ...}}), got type {part.type!r}.",
                param=f"{param}[{i}].content[{j}]",
            )
        texts.append(part.text)
    return "".join(texts)


def check_chat_unsupported(req: ChatCompletionRequest) -> None:
    """Refuse what this server cannot honour rather than silently ignore it."""
    # As vLLM: top_logprobs 0 without logprobs asks for nothing, and is accepted.
    if req.top_logprobs and not req.logprobs:
        raise RequestError("`top_logprobs` needs `logprobs` set to true.", param="top_logprobs")


def chat_logprobs(
    token_ids: list[int], logprobs: list[dict[int, Logprob]], decode: TokenNamer, top_k: int
) -> dict[str, list[Any]]:
    """Chat's logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
    content = []
    for tid, entry in zip(token_ids, logprobs, strict=False):
        tok = decode(tid, entry)
        sampled = entry.get(tid)
        ranked = sorted(
            ((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top_k),
            key=lambda kv: kv[1].rank or 0,
        )
        tops = []
        for t, lp in ranked[:top_k]:
            s = decode(t, entry)
            tops.append(
                {"token": s, "logprob": clamp_logprob(lp.logprob), "bytes": list(s.encode())}
            )
        content.append(
            {
                "token": tok,
                "logprob": clamp_logprob(sampled.logprob) if sampled is not None else MIN_LOGPROB,
                "bytes": list(tok.encode()),
                "top_logprobs": tops,
            }
        )
    return {"content": content}
