"""From a StructuredOutputsParams to xgrammar: the one place that knows each kind's compile call.

Used twice: the frontend converts a spec without a tokenizer (`check_spec`) so that a bad
schema, regex or grammar is a 400 naming it; the EngineCore compiles it against the
vocabulary (`compile_spec`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from engine_core.protocol import StructuredOutputsParams

# Keywords xgrammar would silently ignore: refused, so that no output claims a constraint
# it was not held to (vLLM refuses most of the same ones for its xgrammar backend).
UNSUPPORTED_SCHEMA_KEYWORDS = frozenset(
    {
        "multipleOf",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "not",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "unevaluatedProperties",
        "unevaluatedItems",
        "propertyNames",
    }
)
# Where a schema nests schemas: keyword -> how its value holds them.
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "additionalItems")
_WS = "[ \\n\\r\\t]*"
_LABELS = {"json": "JSON schema", "json_object": "JSON grammar", "structural_tag": "structural tag"}


class GrammarSpecError(ValueError):
    """A spec that cannot become a grammar; `param` names the bad part (a JSON path)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def unsupported_schema_keyword(schema: Any, path: str = "") -> tuple[str, str] | None:
    """The first keyword xgrammar cannot enforce, as (keyword, its path), or None."""
    if isinstance(schema, list):
        for i, sub in enumerate(schema):
            found = unsupported_schema_keyword(sub, f"{path}[{i}]")
            if found:
                return found
        return None
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        if key in UNSUPPORTED_SCHEMA_KEYWORDS:
            return key, f"{path}.{key}" if path else key
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                found = unsupported_schema_keyword(sub, f"{path}.{key}.{name}".lstrip("."))
                if found:
                    return found
        elif key in _SUBSCHEMA_LISTS or key in _SUBSCHEMA_ONE:
            found = unsupported_schema_keyword(value, f"{path}.{key}".lstrip("."))
            if found:
                return found
    return None


def structural_tag_json(text: str) -> str:
    """xgrammar's structural tag; vLLM's older form ({"structures": [{"begin", "schema",
    "end"}], "triggers"}) becomes its triggered_tags format."""
    try:
        tag = json.loads(text)
    except json.JSONDecodeError as e:
        raise GrammarSpecError(
            f"The structural tag is not valid JSON: {e}", "structured_outputs.structural_tag"
        ) from None
    if not isinstance(tag, dict) or "format" in tag or "structures" not in tag:
        return text
    tags = [
        {
            "begin": s.get("begin", ""),
            "content": {"type": "json_schema", "json_schema": s.get("schema", {})},
            "end": s.get("end", ""),
        }
        for s in tag["structures"]
    ]
    fmt = {"type": "triggered_tags", "triggers": tag.get("triggers", []), "tags": tags}
    return json.dumps({"type": "structural_tag", "format": fmt})


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar whose sentences are exactly the choices."""
    # JSON string escapes are EBNF string escapes.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _json_grammar(xgr: Any, params: StructuredOutputsParams) -> Any:
    """The Grammar of a json / json_object spec, with its whitespace rule."""
    any_ws = not params.disable_any_whitespace
    if params.json_object:
        grammar = xgr.Grammar.builtin_json_grammar()
    else:
        grammar = xgr.Grammar.from_json_schema(params.json, any_whitespace=any_ws)
    if params.whitespace_pattern is None:
        return grammar
    # Swap the converter's whitespace rule for the pattern, outside lookahead assertions.
    text = str(grammar)
    lines = []
    for line in text.splitlines():
        head, sep, look = line.partition(" (=(")
        lines.append(head.replace(_WS, "ws_pattern") + sep + look)
    lines.append(f"ws_pattern ::= Regex({json.dumps(params.whitespace_pattern)})")
    return xgr.Grammar.from_ebnf("\n".join(lines))


def grammar_of(params: StructuredOutputsParams) -> Any:
    """The spec as an xgrammar Grammar (no tokenizer needed); GrammarSpecError names what fails."""
    import xgrammar as xgr

    kind = params.kind
    param = f"structured_outputs.{kind}"
    if kind == "json":
        try:
            schema = json.loads(params.json)
        except json.JSONDecodeError as e:
            raise GrammarSpecError(f"The JSON schema is not valid JSON: {e}", param) from None
        if not isinstance(schema, dict | bool):
            raise GrammarSpecError(
                f"A JSON schema must be an object or a boolean, got {type(schema).__name__}.",
                param,
            )
        found = unsupported_schema_keyword(schema)
        if found:
            raise GrammarSpecError(
                f"The JSON schema uses `{found[0]}` (at {found[1]}), which structured "
                "outputs cannot enforce.",
                f"{param}.{found[1]}",
            )
    if kind == "regex":
        try:
            re.compile(params.regex)
        except re.error as e:
            raise GrammarSpecError(f"Invalid regex {params.regex!r}: {e}", param) from None
    if kind == "choice" and not all(isinstance(c, str) for c in params.choice):
        raise GrammarSpecError("structured_outputs.choice must be a list of strings.", param)
    try:
        if kind in ("json", "json_object"):
            return _json_grammar(xgr, params)
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(choice_ebnf(params.choice))
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(params.grammar)
        return xgr.Grammar.from_structural_tag(structural_tag_json(params.structural_tag))
    except Exception as e:  # xgrammar raises RuntimeError/ValueError with its parser's message
        label = _LABELS.get(kind, kind)
        raise GrammarSpecError(f"Invalid {label}: {_xgr_message(e)}", param) from None


def check_spec(params: StructuredOutputsParams) -> None:
    """Raise GrammarSpecError unless the spec converts to a grammar."""
    grammar_of(params)


def compile_spec(compiler: Any, params: StructuredOutputsParams) -> Any:
    """The spec compiled against the compiler's vocabulary (an xgrammar CompiledGrammar)."""
    if params.kind == "regex":
        return compiler.compile_regex(params.regex)
    return compiler.compile_grammar(grammar_of(params))


def _xgr_message(e: Exception) -> str:
    # xgrammar prefixes "[hh:mm:ss] /project/cpp/file.cc:123: ": keep the message only.
    text = str(e).strip()
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)
