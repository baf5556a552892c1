"""One chat choice's tool calls, read from its text: whole for a response, delta by delta for
a stream (OpenAI's shapes: message.tool_calls; delta.tool_calls with name first)."""

from __future__ import annotations

import json
from typing import Any

from frontend.tool_parsers import ToolCallStreamer, ToolParser, json_objects, scan_call
from frontend.tools import ToolSetup, tool_call


class ChoiceTools:
    """The tool-call view of one choice's output under a request's ToolSetup."""

    def __init__(self, setup: ToolSetup, parser: ToolParser | None) -> None:
        self.setup = setup
        self.parser = parser
        self.text = ""
        self.content_sent = 0
        self.streamer = ToolCallStreamer()

    # ---------------------------------------------------------------- whole

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The response's message and its finish_reason ("tool_calls" when it made calls)."""
        content, calls = self._calls(text)
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = [tool_call(name, args) for name, args in calls]
        else:
            msg["tool_calls"] = []
        return msg, _finish(finish_reason, bool(calls))

    def _calls(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        mode = self.setup.mode
        if mode == "named":
            assert self.setup.named is not None
            return None, [(self.setup.named, text)]
        if mode == "required":
            try:
                items = json.loads(text)
                calls = [
                    (c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in items
                ]
            except (json.JSONDecodeError, TypeError, KeyError):
                return text, []  # cut short (max_tokens): no complete call to report
            return None, calls
        if mode == "auto" and self.parser is not None:
            return self.parser.extract(text)
        return text, []

    # ---------------------------------------------------------------- streamed

    def delta(self, new_text: str, final: bool) -> dict[str, Any]:
        """The delta for new text: content and/or tool_calls fragments (empty: nothing yet)."""
        self.text += new_text
        mode = self.setup.mode
        content = ""
        if mode == "named":
            assert self.setup.named is not None
            calls = self.streamer.named(self.setup.named, self.text)
        elif mode == "required":
            calls = self.streamer.deltas([scan_call(r) for r in json_objects(self.text)])
        elif mode == "auto" and self.parser is not None:
            text_content, regions = self.parser.split(self.text, final)
            content = text_content[self.content_sent :]
            self.content_sent = max(self.content_sent, len(text_content))
            calls = self.streamer.deltas([scan_call(r) for r in regions])
        else:
            content, calls = new_text, []
        out: dict[str, Any] = {}
        if content:
            out["content"] = content
        if calls:
            out["tool_calls"] = calls
        return out

    def finish_reason(self, finish_reason: str | None) -> str | None:
        return _finish(finish_reason, self.streamer.num_calls > 0)


def _finish(finish_reason: str | None, called: bool) -> str | None:
    # A call that ran out of tokens stays "length": its arguments are cut short.
    return "tool_calls" if called and finish_reason == "stop" else finish_reason
