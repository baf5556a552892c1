"""Tool-call parsers: read tool calls out of a model's text, whole or as it streams.

A parser splits the text into content and call regions (the JSON text of each call, the
last one possibly still growing). `ToolCallStreamer` turns growing regions into OpenAI's
deltas: a call's id and name first, then its arguments in fragments, `index` per call.
Register more with `@register("name")`; `--tool-call-parser NAME` picks one.
"""

from __future__ import annotations

import json
import re
from typing import Any

from frontend.tools import new_call_id

_NAME_RE = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS_RE = re.compile(r'"(?:arguments|parameters)"\s*:\s*')

PARSERS: dict[str, type[ToolParser]] = {}


def register(name: str):
    def deco(cls: type[ToolParser]) -> type[ToolParser]:
        PARSERS[name] = cls
        cls.name = name
        return cls

    return deco


def get_parser(name: str) -> ToolParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown tool call parser {name!r}; available: {', '.join(sorted(PARSERS))}"
        ) from None


class ToolParser:
    """Splits model text into (content, call regions)."""

    name = ""

    def split(self, text: str, final: bool) -> tuple[str, list[str]]:
        """Content so far and the JSON text of each call; not final: hold back what may yet
        turn out to open a call."""
        raise NotImplementedError

    def extract(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        """The finished text's content (None if empty) and its calls as (name, arguments)."""
        content, regions = self.split(text, final=True)
        calls = [c for c in (parse_call(r) for r in regions) if c is not None]
        if regions and not calls:
            return text, []  # nothing parsed: the model only looked like calling a tool
        return content.strip() or None, calls


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


@register("hermes")
class HermesToolParser(ToolParser):
    """Hermes / Qwen style: <tool_call>{"name": ..., "arguments": {...}}</tool_call>."""

    open_tag, close_tag = "<tool_call>", "</tool_call>"

    def split(self, text: str, final: bool) -> tuple[str, list[str]]:
        first = text.find(self.open_tag)
        if first < 0:
            held = 0 if final else _held_prefix(text, self.open_tag)
            return text[: len(text) - held], []
        regions = []
        for part in text[first:].split(self.open_tag)[1:]:
            body, closed, _ = part.partition(self.close_tag)
            if not closed and not final:
                body = body[: len(body) - _held_prefix(body, self.close_tag)]
            regions.append(body.strip())
        return text[:first], regions


@register("llama3_json")
class Llama3JsonToolParser(ToolParser):
    """Llama 3.x JSON calls: {"name": ..., "parameters": {...}}, several separated by ';',
    optionally after <|python_tag|>."""

    tag = "<|python_tag|>"

    def split(self, text: str, final: bool) -> tuple[str, list[str]]:
        body = text.lstrip()
        if body.startswith(self.tag):
            body = body[len(self.tag) :].lstrip()
        if not body:
            return ("" if not final else text), []
        if not body.startswith("{"):
            if not final and self.tag.startswith(body):
                return "", []
            return text, []
        return "", json_objects(body)


def json_objects(text: str) -> list[str]:
    """The top-level JSON objects in text (the last possibly unfinished), whatever lies between."""
    out, depth, start, in_str, esc = [], 0, -1, False, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = depth > 0
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                out.append(text[start : i + 1])
    if depth > 0:
        out.append(text[start:])
    return out


def value_end(text: str, start: int) -> int | None:
    """Index just past the JSON value starting at `start`, or None while it is unfinished."""
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
                if depth == 0:
                    return i + 1
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        elif depth == 0 and ch in ",}":
            return i
    return None


def parse_call(region: str) -> tuple[str, str] | None:
    """A finished call region as (name, arguments JSON text), or None if it is not one."""
    try:
        obj, _ = json.JSONDecoder().raw_decode(region)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        return obj["name"], args
    return obj["name"], json.dumps(args, ensure_ascii=False)


def scan_call(region: str) -> tuple[str | None, str | None, bool]:
    """A growing call region as (name, arguments text so far, arguments finished).

    Only when the name comes before the arguments (as grammars and most models write it);
    otherwise the call is read whole once it parses.
    """
    args_m = _ARGS_RE.search(region)
    name_m = _NAME_RE.search(region, 0, args_m.start() if args_m else len(region))
    if name_m is None:
        parsed = parse_call(region)
        return (parsed[0], parsed[1], True) if parsed else (None, None, False)
    name = json.loads(f'"{name_m.group(1)}"')
    if args_m is None:
        return name, None, False
    start = args_m.end()
    end = value_end(region, start)
    if end is None:
        return name, region[start:].rstrip(), False
    return name, region[start:end], True


class ToolCallStreamer:
    """Turns growing call regions into tool_calls deltas (name first, then argument text)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.names: list[str] = []
        self.sent_args: list[int] = []  # characters of arguments sent, per call

    @property
    def num_calls(self) -> int:
        return len(self.ids)

    def deltas(self, calls: list[tuple[str | None, str | None, bool]]) -> list[dict[str, Any]]:
        """calls: (name, arguments so far, finished) per call, in order."""
        out = []
        for index, (name, args, _done) in enumerate(calls):
            if index >= len(self.ids):
                if name is None or index > len(self.ids):
                    break
                self.ids.append(new_call_id())
                self.names.append(name)
                self.sent_args.append(0)
                header = {"name": name, "arguments": ""}
                out.append({"index": index, "id": self.ids[index], "type": "function"})
                out[-1]["function"] = header
            if args is not None and len(args) > self.sent_args[index]:
                out.append(
                    {"index": index, "function": {"arguments": args[self.sent_args[index] :]}}
                )
                self.sent_args[index] = len(args)
        return out

    def named(self, name: str, arguments_so_far: str) -> list[dict[str, Any]]:
        """A named tool_choice: the whole text is the one call's arguments."""
        return self.deltas([(name, arguments_so_far, False)])
