"""OpenAI tools in chat: validation, tool_choice, the grammar that enforces it, the messages.

tool_choice "none": tools are shown to the template, never called. "auto": the model
decides and a tool-call parser reads its text (--enable-auto-tool-choice). A named function:
the output is that function's arguments, held to its parameters' schema. "required": a JSON
list of one or more {"name", "parameters"} calls, each held to its tool's schema.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from engine_core.protocol import StructuredOutputsParams
from frontend.openai_protocol import RequestError

_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ToolSetup:
    """A chat request's tools, as the server acts on them."""

    tools: list[dict[str, Any]]  # the request's function tools, for the chat template
    mode: str  # "none" | "auto" | "required" | "named"
    named: str | None = None  # mode "named": the function's name
    parallel: bool = True

    def parameters(self, name: str) -> dict[str, Any]:
        for t in self.tools:
            if t["function"]["name"] == name:
                return t["function"].get("parameters") or _EMPTY_PARAMETERS
        raise KeyError(name)

    def structured_outputs(self) -> StructuredOutputsParams | None:
        """The grammar that enforces tool_choice (named or required); None otherwise."""
        # Compact JSON: arguments need no free whitespace, and a sampled call cannot spend
        # its tokens on it.
        if self.mode == "named":
            assert self.named is not None
            return StructuredOutputsParams(
                json=json.dumps(self.parameters(self.named)), disable_any_whitespace=True
            )
        if self.mode != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [t["function"]["name"]]},
                    "parameters": t["function"].get("parameters") or _EMPTY_PARAMETERS,
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for t in self.tools
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=json.dumps(schema), disable_any_whitespace=True)


def tool_setup(
    tools: list[Any] | None,
    tool_choice: Any,
    parallel_tool_calls: bool | None,
    auto_enabled: bool,
) -> ToolSetup | None:
    """Validate tools and tool_choice (400s naming the bad part); None when there are no tools."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise RequestError(
                "`tool_choice` needs `tools`: there is no tool to choose.", param="tool_choice"
            )
        return None
    names = []
    for i, t in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else type(t).__name__
            raise RequestError(
                f"tools[{i}] must be a function tool ({{'type': 'function', 'function': ...}}), "
                f"got type {kind!r}.",
                param=f"{param}.type",
            )
        fn = t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(
                f"tools[{i}].function must be an object with a non-empty `name`.",
                param=f"{param}.function",
            )
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise RequestError(
                f"tools[{i}].function.parameters must be a JSON schema object.",
                param=f"{param}.function.parameters",
            )
        if fn["name"] in names:
            raise RequestError(
                f"tools[{i}]: the function name {fn['name']!r} is used twice.",
                param=f"{param}.function.name",
            )
        names.append(fn["name"])
    setup = ToolSetup(tools=list(tools), mode="auto", parallel=parallel_tool_calls is not False)
    if tool_choice is None:
        tool_choice = "auto"  # OpenAI's and vLLM's default when tools are given
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise RequestError(
                f"tool_choice must be 'none', 'auto', 'required' or a named function, got "
                f"{tool_choice!r}.",
                param="tool_choice",
            )
        setup.mode = tool_choice
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if name not in names:
            raise RequestError(
                f"tool_choice names the function {name!r}, which is not in `tools` "
                f"({', '.join(map(repr, names))}).",
                param="tool_choice.function.name",
            )
        setup.mode, setup.named = "named", name
    else:
        raise RequestError(
            "tool_choice must be 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}.",
            param="tool_choice",
        )
    if setup.mode == "auto" and not auto_enabled:
        raise RequestError(
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
            "to be set.",
            param="tool_choice",
        )
    return setup


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def tool_call(name: str, arguments: str, call_id: str | None = None) -> dict[str, Any]:
    """One entry of message.tool_calls."""
    return {
        "id": call_id or new_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def template_tool_calls(tool_calls: list[Any], param: str) -> list[dict[str, Any]]:
    """An assistant message's tool_calls as chat templates read them: arguments as a dict."""
    out = []
    for j, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(
                f"{param}[{j}] must be {{'id', 'type': 'function', 'function': {{'name', "
                "'arguments'}}}}.",
                param=f"{param}[{j}]",
            )
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args else {}
            except json.JSONDecodeError:
                raise RequestError(
                    f"{param}[{j}].function.arguments is not valid JSON.",
                    param=f"{param}[{j}].function.arguments",
                ) from None
        out.append(
            {
                "id": call.get("id"),
                "type": "function",
                "function": {"name": fn["name"], "arguments": args},
            }
        )
    return out
