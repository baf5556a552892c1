"""One client stream across backends: what has been sent, and the continuation request that
lets another backend pick up where a dead one stopped (mid-stream failover).

With our frontend the router asks for `return_token_ids` and continues with
`continuation_token_ids` (exact in tokens); with any other server it continues from the text
(completions: the prompt plus the text; chat: a final assistant message continued with
`continue_final_message`, without a new generation prompt, as vLLM offers)."""

from __future__ import annotations

import copy
import json
from typing import Any

_DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def can_failover(body: Any) -> bool:
    """One prompt, one choice: what a continuation can reproduce."""
    if not isinstance(body, dict) or body.get("n", 1) not in (1, None):
        return False
    if body.get("best_of") not in (None, 1):
        return False
    p = body.get("prompt")
    if "messages" in body:
        return isinstance(body["messages"], list)
    return isinstance(p, str) or (isinstance(p, list) and all(isinstance(x, int) for x in p))


class StreamState:
    """The client's view of one streamed choice, built from the chunks relayed so far."""

    def __init__(self, body: dict, chat: bool, client_wants_ids: bool) -> None:
        self.body = body
        self.chat = chat
        self.client_wants_ids = client_wants_ids
        self.text = ""
        self.ids: list[int] = []
        self.exact = True  # every chunk carried its token ids
        self.count = 0  # tokens (or, without ids, chunks) generated so far
        self.finished = False
        self.envelope: dict | None = None  # id, created, model of the first stream
        self.continuing = False
        self.prompt_offset = 0  # tokens the current continuation added to the prompt
        self.count_offset = 0  # tokens generated before the current continuation
        self.echo_chars = 0

    def absorb(self, obj: dict) -> bytes | None:
        """Record one chunk; the bytes to send the client (None: nothing to send)."""
        if self.envelope is None:
            self.envelope = {k: obj.get(k) for k in ("id", "created", "model")}
            if self.body.get("echo") and isinstance(self.body.get("prompt"), str):
                self.echo_chars = len(self.body["prompt"])
        else:
            obj.update({k: v for k, v in self.envelope.items() if v is not None})
        keep = []
        for c in obj.get("choices") or []:
            ids = c.get("token_ids") if self.client_wants_ids else c.pop("token_ids", None)
            if self.chat:
                delta = c.get("delta") or {}
                if self.continuing:
                    delta.pop("role", None)
                text = delta.get("content") or ""
                empty = not text and all(k == "content" for k in delta)
            else:
                text = c.get("text") or ""
                empty = not text
            if isinstance(ids, list):
                self.ids.extend(ids)
                self.count += len(ids)
            elif text:
                self.exact = False
                self.count += 1
            self.text += text
            if c.get("finish_reason") is not None:
                self.finished = True
            if empty and c.get("finish_reason") is None and c.get("logprobs") is None:
                continue  # held-back text: only token ids the client did not ask for
            keep.append(c)
        usage = obj.get("usage")
        if usage and self.continuing:
            usage["prompt_tokens"] = max(0, usage.get("prompt_tokens", 0) - self.prompt_offset)
            usage["completion_tokens"] = usage.get("completion_tokens", 0) + self.count_offset
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if not keep and not usage and obj.get("choices"):
            return None
        obj["choices"] = keep
        return sse(obj)

    def remaining_tokens(self) -> int | None:
        b = self.body
        if self.chat:
            limit = b.get("max_completion_tokens", b.get("max_tokens"))
        else:
            limit = b.get("max_tokens", 16)  # OpenAI's default for completions
        return None if limit is None else limit - self.count

    def continuation(self, exact: bool) -> dict:
        """The request that continues this stream on another backend."""
        b = copy.deepcopy(self.body)
        b["stream"] = True
        b.pop("echo", None)
        left = self.remaining_tokens()
        if left is not None:
            key = "max_completion_tokens" if "max_completion_tokens" in b else "max_tokens"
            b[key] = left
        if b.get("min_tokens"):
            b["min_tokens"] = max(0, b["min_tokens"] - self.count)
        self.count_offset = self.count
        if exact and self.exact:
            b["return_token_ids"] = True
            b["continuation_token_ids"] = list(b.get("continuation_token_ids") or []) + self.ids
            self.prompt_offset = len(self.ids)
        else:
            b.pop("return_token_ids", None)
            b.pop("continuation_token_ids", None)
            text = self.text[self.echo_chars :]
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
                b["prompt"] = b["prompt"] + self.ids
            self.prompt_offset = self.count
        self.continuing = True
        return b

    def final_chunk(self) -> bytes:
        """A closing chunk when the budget ran out exactly at the failure."""
        c: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
        if self.chat:
            c["delta"] = {}
        else:
            c["text"] = ""
        obj = dict(self.envelope or {})
        obj["object"] = "chat.completion.chunk" if self.chat else "text_completion"
        obj["choices"] = [c]
        return sse(obj)
