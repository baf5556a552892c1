"""One client stream across backends: what each choice has been sent, and the continuation
requests that let other backends pick up where a dead one stopped (mid-stream failover).

A request with several prompts or `n > 1` streams one choice per (prompt, sample); when its
backend dies, every unfinished choice continues as a request of its own (one prompt, `n: 1`)
whose choice 0 is mapped back to the client's index, and finished choices stay finished.
With our frontend the router asks for `return_token_ids` and continues with
`continuation_token_ids` (exact in tokens); with any other server it continues from the text
(completions: the prompt plus the text; chat: a final assistant message continued with
`continue_final_message`, without a new generation prompt, as vLLM offers)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

_DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(type(t) is int for t in x)


def prompts_of(body: dict) -> list[Any] | None:
    """A completion request's prompts (strings or token-id lists), as our frontend and vLLM
    number their choices (prompt i, sample j: index i * n + j); None when not one of those."""
    p = body.get("prompt")
    if isinstance(p, str) or _is_ids(p):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return list(p)
    if isinstance(p, list) and p and all(_is_ids(x) for x in p):
        return list(p)
    return None


def can_failover(body: Any) -> bool:
    """Whether a continuation can reproduce this request's remaining stream: not with tools or
    a grammar (the continuation would restart their parser or matcher mid-output)."""
    if not isinstance(body, dict):
        return False
    n = body.get("n", 1)
    if n is None:
        n = 1
    if type(n) is not int or n < 1 or body.get("best_of") not in (None, n):
        return False
    if body.get("tools") and body.get("tool_choice") != "none":
        return False
    fmt = body.get("response_format")
    if body.get("structured_outputs") or (isinstance(fmt, dict) and fmt.get("type") != "text"):
        return False
    if "messages" in body:
        return isinstance(body["messages"], list)
    return prompts_of(body) is not None


@dataclass
class Choice:
    """What the client has received of one choice."""

    index: int  # the client's choice index
    prompt: int  # which of the request's prompts it samples
    echo_chars: int = 0  # the echoed prompt at the start of `text`
    text: str = ""
    ids: list[int] = field(default_factory=list)
    exact: bool = True  # every chunk carried its token ids
    count: int = 0  # tokens (or, without ids, chunks) generated so far
    finished: bool = False
    base_chars: int = 0  # characters sent before the current continuation (logprobs offsets)
    base_count: int = 0  # tokens generated before the current continuation


@dataclass
class Part:
    """What one upstream stream covers: the original request (`indexes` None: its indexes are
    the client's) or a continuation of one choice (its index 0 is the client's `indexes[0]`)."""

    indexes: dict[int, int] | None = None
    prompt: int = -1
    prompt_offset: int = 0  # tokens the continuation added to the prompt


class StreamState:
    """The client's view of one streamed request, built from the chunks relayed so far."""

    def __init__(self, body: dict, chat: bool, client_wants_ids: bool) -> None:
        self.body = body
        self.chat = chat
        self.client_wants_ids = client_wants_ids
        n = body.get("n") or 1
        self.prompts: list[Any] = [None] if chat else (prompts_of(body) or [None])
        echo = bool(body.get("echo")) and not chat
        self.choices: dict[int, Choice] = {}
        for i, p in enumerate(self.prompts):
            for j in range(n):
                c = Choice(i * n + j, i, len(p) if echo and isinstance(p, str) else 0)
                self.choices[c.index] = c
        self.envelope: dict | None = None  # id, created, model of the first stream
        self.failed_over = False
        self.usage_sent = False
        self.prompt_tokens: dict[int, int] = {}  # per prompt, learned from continuations

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.choices.values())

    def covered(self, part: Part) -> list[Choice]:
        if part.indexes is None:
            return list(self.choices.values())
        return [self.choices[g] for g in part.indexes.values()]

    def absorb(self, obj: dict, part: Part | None = None) -> bytes | None:
        """Record one chunk of `part`'s stream; the bytes to send the client (None: nothing)."""
        part = part or Part()
        cont = part.indexes is not None
        if self.envelope is None:
            self.envelope = {k: obj.get(k) for k in ("id", "created", "model")}
        else:
            obj.update({k: v for k, v in self.envelope.items() if v is not None})
        keep = []
        for c in obj.get("choices") or []:
            if part.indexes is not None:
                g = part.indexes.get(c.get("index", 0))
                if g is None:
                    continue
                c["index"] = g
            ch = self.choices.get(c.get("index", 0))
            ids = c.get("token_ids") if self.client_wants_ids else c.pop("token_ids", None)
            if self.chat:
                delta = c.get("delta") or {}
                if cont:
                    delta.pop("role", None)
                text = delta.get("content") or ""
                empty = not text and all(k == "content" for k in delta)
            else:
                text = c.get("text") or ""
                empty = not text
                lps = c.get("logprobs")
                if cont and ch is not None and isinstance(lps, dict) and lps.get("text_offset"):
                    lps["text_offset"] = [o + ch.base_chars for o in lps["text_offset"]]
            if ch is not None:
                if isinstance(ids, list):
                    ch.ids.extend(ids)
                    ch.count += len(ids)
                elif text:
                    ch.exact = False
                    ch.count += 1
                ch.text += text
                if c.get("finish_reason") is not None:
                    ch.finished = True
            if empty and c.get("finish_reason") is None and c.get("logprobs") is None:
                continue  # held-back text: only token ids the client did not ask for
            keep.append(c)
        usage = obj.get("usage")
        if usage and (cont or self.failed_over):
            self._learn(obj.pop("usage"), part)  # the whole request's usage comes at the end
            usage = None
        elif usage:
            self.usage_sent = True
        if not keep and not usage:
            return None
        obj["choices"] = keep
        return sse(obj)

    def _learn(self, usage: dict, part: Part) -> None:
        if part.prompt >= 0:
            self.prompt_tokens[part.prompt] = max(
                0, int(usage.get("prompt_tokens", 0)) - part.prompt_offset
            )
            for ch in self.covered(part):
                ch.count = ch.base_count + int(usage.get("completion_tokens", 0))

    def remaining_tokens(self, ch: Choice) -> int | None:
        b = self.body
        if self.chat:
            limit = b.get("max_completion_tokens", b.get("max_tokens"))
        else:
            limit = b.get("max_tokens", 16)  # OpenAI's default for completions
        return None if limit is None else limit - ch.count

    def continuation(self, ch: Choice, exact: bool) -> tuple[dict, Part] | None:
        """The request that continues choice `ch` on another backend (`exact`: one of ours),
        and what its stream covers; None when it cannot be continued (a token-id prompt on a
        server without token ids in its stream)."""
        b = copy.deepcopy(self.body)
        b["stream"] = True
        b.pop("echo", None)
        b.pop("best_of", None)
        b["n"] = 1
        if not self.chat:
            b["prompt"] = copy.deepcopy(self.prompts[ch.prompt])
        left = self.remaining_tokens(ch)
        if left is not None:
            key = "max_completion_tokens" if "max_completion_tokens" in b else "max_tokens"
            b[key] = left
        if b.get("min_tokens"):
            b["min_tokens"] = max(0, b["min_tokens"] - ch.count)
        if exact and ch.exact:
            b["return_token_ids"] = True
            own = list(b.get("continuation_token_ids") or []) if len(self.prompts) == 1 else []
            b["continuation_token_ids"] = own + ch.ids
            offset = len(ch.ids)
        else:
            b.pop("return_token_ids", None)
            b.pop("continuation_token_ids", None)
            text = ch.text[ch.echo_chars :]
            if self.chat:
                msgs = b["messages"]
                if b.get("continue_final_message") and msgs and msgs[-1].get("role") == "assistant":
                    msgs[-1] = {**msgs[-1], "content": (msgs[-1].get("content") or "") + text}
                else:
                    msgs.append({"role": "assistant", "content": text})
                b["continue_final_message"] = True
                b["add_generation_prompt"] = False
            elif isinstance(b["prompt"], str):
                b["prompt"] = b["prompt"] + text
            else:
                return None  # a token-id prompt continued from text: no ids to add
            offset = ch.count  # approximate: chunks, not tokens
        ch.base_chars, ch.base_count = len(ch.text), ch.count
        self.failed_over = True
        return b, Part({0: ch.index}, ch.prompt, offset)

    def final_chunk(self, ch: Choice) -> bytes:
        """A closing chunk for a choice whose budget ran out exactly at the failure."""
        ch.finished = True
        c: dict[str, Any] = {"index": ch.index, "logprobs": None, "finish_reason": "length"}
        if self.chat:
            c["delta"] = {}
        else:
            c["text"] = ""
        return sse(self._envelope([c]))

    def _envelope(self, choices: list, usage: dict | None = None) -> dict:
        obj = dict(self.envelope or {})
        obj["object"] = "chat.completion.chunk" if self.chat else "text_completion"
        obj["choices"] = choices
        if usage is not None:
            obj["usage"] = usage
        return obj

    def wants_usage(self) -> bool:
        """Whether the client asked for usage and has not had it (the failover swallowed it)."""
        opts = self.body.get("stream_options")
        return isinstance(opts, dict) and bool(opts.get("include_usage")) and not self.usage_sent

    def unknown_prompts(self) -> list[int]:
        """Prompts whose token count no continuation reported (their choices had finished)."""
        out = []
        for i, p in enumerate(self.prompts):
            if i in self.prompt_tokens:
                continue
            if _is_ids(p):
                self.prompt_tokens[i] = len(p)
            else:
                out.append(i)
        return out

    def usage_chunk(self) -> bytes:
        """The whole request's usage: each prompt counted once, completion tokens summed over
        every choice and every backend that streamed a part of it."""
        pt = sum(self.prompt_tokens.values())
        ct = sum(c.count for c in self.choices.values())
        self.usage_sent = True
        usage = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
        return sse(self._envelope([], usage))

    def tokenize_body(self, prompt: int) -> dict:
        """The /tokenize request that counts one prompt's tokens."""
        b = self.body
        out: dict[str, Any] = {"model": b.get("model")} if b.get("model") else {}
        if self.chat:
            out["messages"] = b["messages"]
            for k in ("add_generation_prompt", "continue_final_message", "chat_template_kwargs"):
                if k in b:
                    out[k] = b[k]
        else:
            out["prompt"] = self.prompts[prompt]
            out["add_special_tokens"] = b.get("add_special_tokens", True)
        return out
