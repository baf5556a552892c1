"""Tool-call parsers and the streamer: whole texts, and texts fed in every possible split."""

from __future__ import annotations

import json

import pytest

from frontend.openai_protocol import RequestError
from frontend.tool_output import ChoiceTools
from frontend.tool_parsers import PARSERS, get_parser
from frontend.tools import tool_setup

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "add"}},
]


def stream_all(view: ChoiceTools, text: str, step: int) -> tuple[str, list[dict]]:
    """Feed text `step` characters at a time; reassemble content and calls as a client does."""
    content, calls = "", []
    pieces = [text[i : i + step] for i in range(0, len(text), step)] or [""]
    for k, piece in enumerate(pieces):
        delta = view.delta(piece, final=k == len(pieces) - 1)
        content += delta.get("content", "")
        for d in delta.get("tool_calls", []):
            if d["index"] == len(calls):
                assert d["function"]["name"], "a new call starts with its name"
                calls.append({"id": d["id"], "name": d["function"]["name"], "arguments": ""})
            calls[d["index"]]["arguments"] += d["function"].get("arguments", "")
    return content, calls


def test_registry_has_hermes_and_llama3_json():
    assert {"hermes", "llama3_json"} <= set(PARSERS)
    with pytest.raises(ValueError, match="unknown tool call parser 'nope'"):
        get_parser("nope")


HERMES = (
    'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris, \\"FR\\""}}'
    '\n</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": {"c": [2]}}}</tool_call>'
)


def test_hermes_whole_text():
    content, calls = get_parser("hermes").extract(HERMES)
    assert content == "Let me check."
    assert [c[0] for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[0][1]) == {"city": 'Paris, "FR"'}
    assert json.loads(calls[1][1]) == {"a": 1, "b": {"c": [2]}}


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_hermes_streamed_in_any_split(step):
    setup = tool_setup(TOOLS, "auto", None, auto_enabled=True)
    view = ChoiceTools(setup, get_parser("hermes"))
    content, calls = stream_all(view, HERMES, step)
    assert content.strip() == "Let me check."
    assert [c["name"] for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[0]["arguments"]) == {"city": 'Paris, "FR"'}
    assert json.loads(calls[1]["arguments"]) == {"a": 1, "b": {"c": [2]}}
    assert view.finish_reason("stop") == "tool_calls"


def test_hermes_plain_text_is_content():
    view = ChoiceTools(tool_setup(TOOLS, "auto", None, True), get_parser("hermes"))
    content, calls = stream_all(view, "No tool needed <tool", 1)
    assert content == "No tool needed <tool" and calls == []
    assert view.finish_reason("stop") == "stop"


def test_llama3_json_calls_separated_by_semicolons():
    text = '<|python_tag|>{"name": "add", "parameters": {"a": 1}}; {"name": "get_weather", "parameters": {"city": "Oslo"}}'
    content, calls = get_parser("llama3_json").extract(text)
    assert content is None
    assert calls == [("add", '{"a": 1}'), ("get_weather", '{"city": "Oslo"}')]
    view = ChoiceTools(tool_setup(TOOLS, "auto", None, True), get_parser("llama3_json"))
    content, streamed = stream_all(view, text, 3)
    assert content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == [
        ("add", {"a": 1}),
        ("get_weather", {"city": "Oslo"}),
    ]
    assert get_parser("llama3_json").extract("Hello there") == ("Hello there", [])


def test_required_and_named_streams_rebuild_the_calls():
    required = '[{"name": "get_weather", "parameters": {"city": "Rome"}}, {"name": "add", "parameters": {}}]'
    view = ChoiceTools(tool_setup(TOOLS, "required", None, False), None)
    _, calls = stream_all(view, required, 2)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Rome"}),
        ("add", {}),
    ]
    msg, reason = ChoiceTools(tool_setup(TOOLS, "required", None, True), None).message(
        required, "stop"
    )
    assert reason == "tool_calls" and msg["content"] is None
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather", "add"]
    named = tool_setup(
        TOOLS, {"type": "function", "function": {"name": "get_weather"}}, None, False
    )
    _, calls = stream_all(ChoiceTools(named, None), '{"city": "Lima"}', 4)
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {
        "city": "Lima"
    }


def test_required_grammar_schema_and_parallel_calls():
    spec = tool_setup(TOOLS, "required", False, False).structured_outputs()
    schema = json.loads(spec.json)
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    names = [item["properties"]["name"]["enum"] for item in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["add"]]
    assert "maxItems" not in json.loads(
        tool_setup(TOOLS, "required", True, False).structured_outputs().json
    )


@pytest.mark.parametrize(
    "tools, choice, auto, param",
    [
        ([{"type": "retrieval"}], None, True, "tools[0].type"),
        ([{"type": "function", "function": {}}], None, True, "tools[0].function"),
        (
            TOOLS,
            {"type": "function", "function": {"name": "nope"}},
            True,
            "tool_choice.function.name",
        ),
        (TOOLS, "sometimes", True, "tool_choice"),
        (TOOLS, "auto", False, "tool_choice"),
        (None, "required", True, "tool_choice"),
        (TOOLS + TOOLS[:1], "none", True, "tools[2].function.name"),
    ],
)
def test_bad_tools_are_refused_naming_the_part(tools, choice, auto, param):
    with pytest.raises(RequestError) as e:
        tool_setup(tools, choice, None, auto)
    assert e.value.param == param and e.value.status == 400
