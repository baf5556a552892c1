"""Structured outputs in the API: response_format and vLLM's structured_outputs field, checked.

Every spec is converted once here (xgrammar, no tokenizer: fast) so that a bad schema, regex
or grammar is a 400 naming it; the EngineCore compiles it against the vocabulary.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
from typing import Any

from engine_core.protocol import StructuredOutputsParams
from engine_core.structured_output.grammar import GrammarSpecError, check_spec
from frontend.openai_protocol import RequestError

_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# vLLM's fields that pick a backend or fallback: one backend here, so accepted and unused.
_IGNORED = ("backend", "disable_fallback", "disable_additional_properties")
_OPTIONS = ("whitespace_pattern", "disable_any_whitespace")
_CHECK_POOL = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-check")
# A spec whose conversion takes longer is refused (a pathological schema must not hold a
# thread of the server for long; the EngineCore bounds the compile itself the same way).
CHECK_TIMEOUT_S = 10.0


def from_response_format(fmt: dict[str, Any] | None) -> StructuredOutputsParams | None:
    """OpenAI's response_format: text (None), json_object, or json_schema."""
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise RequestError(
                "response_format.json_schema must be an object with `name` and `schema`.",
                param="response_format.json_schema",
            )
        schema = spec.get("schema", {"type": "object"})  # OpenAI's default when left out
        if not isinstance(schema, dict | bool):
            raise RequestError(
                "response_format.json_schema.schema must be a JSON schema (an object).",
                param="response_format.json_schema.schema",
            )
        return StructuredOutputsParams(json=json.dumps(schema))
    raise RequestError(
        f"response_format type {kind!r} is not supported: use 'text', 'json_object' or "
        "'json_schema'.",
        param="response_format.type",
    )


def from_body(field: dict[str, Any] | None) -> StructuredOutputsParams | None:
    """vLLM's structured_outputs body field: one of json, regex, choice, grammar, structural_tag."""
    if field is None:
        return None
    if not isinstance(field, dict):
        raise RequestError("structured_outputs must be an object.", param="structured_outputs")
    unknown = [k for k in field if k not in _KINDS + _IGNORED + _OPTIONS]
    if unknown:
        raise RequestError(
            f"structured_outputs has an unknown field {unknown[0]!r}; expected one of "
            f"{', '.join(_KINDS + _OPTIONS)}.",
            param=f"structured_outputs.{unknown[0]}",
        )
    kinds = [k for k in _KINDS if field.get(k) not in (None, False)]
    if len(kinds) != 1:
        raise RequestError(
            "structured_outputs must have exactly one of "
            f"{', '.join(_KINDS)}; got {', '.join(kinds) or 'none'}.",
            param="structured_outputs",
        )
    kind = kinds[0]
    value = field[kind]
    param = f"structured_outputs.{kind}"
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise RequestError(
                    f"structured_outputs.json is a string but not JSON: {e}", param=param
                ) from None
        if not isinstance(value, dict | bool):
            raise RequestError(
                "structured_outputs.json must be a JSON schema (an object, or its JSON text).",
                param=param,
            )
        value = json.dumps(value)
    elif kind == "choice":
        if not isinstance(value, list) or not value:
            raise RequestError(
                "structured_outputs.choice must be a non-empty list of strings.", param=param
            )
        if not all(isinstance(c, str) for c in value):
            raise RequestError("structured_outputs.choice must be a list of strings.", param=param)
    elif kind == "structural_tag":
        value = value if isinstance(value, str) else json.dumps(value)
    elif kind == "json_object":
        value = True
    elif not isinstance(value, str) or not value:
        raise RequestError(f"{param} must be a non-empty string.", param=param)
    ws = field.get("whitespace_pattern")
    if ws is not None and not isinstance(ws, str):
        raise RequestError(
            "structured_outputs.whitespace_pattern must be a string (a regex).",
            param="structured_outputs.whitespace_pattern",
        )
    return StructuredOutputsParams(
        **{kind: value},
        whitespace_pattern=ws,
        disable_any_whitespace=bool(field.get("disable_any_whitespace", False)),
    )


@functools.lru_cache(maxsize=512)
def _check_cached(keyed: _Keyed) -> str | None:
    try:
        check_spec(keyed.params)
    except GrammarSpecError as e:
        return f"{e.param}\x00{e}"
    return None


def check_sync(params: StructuredOutputsParams, param_prefix: str | None = None) -> None:
    """Raise RequestError unless the spec converts to a grammar (a cached verdict per spec)."""
    verdict = _check_cached(_Keyed(params))
    if verdict is not None:
        param, message = verdict.split("\x00", 1)
        if param_prefix is not None:
            param = param_prefix + param.removeprefix("structured_outputs.json")
        raise RequestError(message, param=param)


async def check(params: StructuredOutputsParams, param_prefix: str | None = None) -> None:
    """check_sync off the event loop, bounded by CHECK_TIMEOUT_S."""
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(_CHECK_POOL, check_sync, params, param_prefix)
    try:
        await asyncio.wait_for(asyncio.shield(fut), CHECK_TIMEOUT_S)
    except TimeoutError:
        raise RequestError(
            f"The structured output spec did not convert to a grammar within "
            f"{CHECK_TIMEOUT_S:g} s; simplify it.",
            param=param_prefix or f"structured_outputs.{params.kind}",
        ) from None


class _Keyed:
    """A spec hashed by its exact content (msgspec Structs are not hashable)."""

    __slots__ = ("params", "_key")

    def __init__(self, params: StructuredOutputsParams) -> None:
        self.params = params
        self._key = params.key()

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Keyed) and other._key == self._key


async def request_spec(req: Any, tools: Any = None) -> StructuredOutputsParams | None:
    """The one structured-output spec of a completion or chat request, checked; a 400 when it
    asks for two (response_format, structured_outputs, a tool_choice that needs a grammar)."""
    asked = []
    fmt = from_response_format(req.response_format)
    if fmt is not None:
        asked.append(("response_format", fmt))
    body = from_body(req.structured_outputs)
    if body is not None:
        asked.append(("structured_outputs", body))
    tool_spec = tools.structured_outputs() if tools is not None else None
    if tool_spec is not None:
        asked.append(("tool_choice", tool_spec))
    if len(asked) > 1:
        names = " and ".join(f"`{name}`" for name, _ in asked)
        raise RequestError(
            f"Only one structured output constraint per request: got {names}.",
            param=asked[1][0],
        )
    if not asked:
        return None
    name, spec = asked[0]
    if name == "tool_choice":
        # Each tool's schema alone first, so that an error names the tool.
        for i, t in enumerate(tools.tools):
            if tools.mode == "named" and t["function"]["name"] != tools.named:
                continue
            params = t["function"].get("parameters")
            if params is not None:
                sub = StructuredOutputsParams(json=json.dumps(params))
                await check(sub, f"tools[{i}].function.parameters")
        await check(spec, "tool_choice")
    elif name == "response_format":
        await check(spec, "response_format.json_schema.schema")
    else:
        await check(spec)
    return spec
