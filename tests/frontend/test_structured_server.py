"""Structured outputs and tools end to end: the real server, the official `openai` client.

Every output is checked against what constrained it: JSON against its schema (jsonschema),
regex by fullmatch, choice by membership, tool arguments against their tool's parameters.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import jsonschema
import openai
import pytest

# A shared, loaded machine can take minutes per test: the limit is a safety net only.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
COMPACT = {"json": SCHEMA, "disable_any_whitespace": True}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
PERSON = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
REGEX = r"[0-9]{3}-[0-9]{4}"
EBNF = 'root ::= "The answer is " ("yes" | "no") "."'
SLOW_SCHEMA = {"type": "string", "enum": [f"item-{i}-{i * 7919 % 10007}" for i in range(16000)]}


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
        "--structured-outputs-compile-timeout",
        "1",
    )


def client_args(server) -> dict:
    """The official client's settings for `server`: no retries, a long timeout."""
    return dict(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(**client_args(server))


@pytest.fixture(scope="module")
def model(oai):
    return oai.models.list().data[0].id


def check_person(text: str) -> None:
    jsonschema.validate(json.loads(text), SCHEMA)


def check_call(call) -> None:
    assert call.type == "function" and call.id
    jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def collect(stream) -> tuple[str, dict[int, dict], list[str | None]]:
    """A chat stream reassembled: content, tool calls by index, finish reasons by choice."""
    content, calls, finish = "", {}, {}
    for chunk in stream:
        for ch in chunk.choices:
            d = ch.delta
            content += d.content or ""
            for tc in d.tool_calls or ():
                if tc.index not in calls:
                    assert tc.function.name, "a streamed call starts with its name"
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                calls[tc.index]["arguments"] += tc.function.arguments or ""
            if ch.finish_reason is not None:
                finish[ch.index] = ch.finish_reason
    return content, calls, [finish[i] for i in sorted(finish)]


def answered_and_streamed(oai, **request) -> tuple:
    """The same chat request answered whole, then streamed: the response, and the stream
    reassembled (collect's content, calls and finish reasons)."""
    r = oai.chat.completions.create(**request)
    return r, collect(oai.chat.completions.create(**request, stream=True))


# ---------------------------------------------------------------- response_format


def test_json_schema_greedy_and_sampled_n2(oai, model):
    r = oai.chat.completions.create(
        model=model, messages=PERSON, response_format=RESPONSE_FORMAT, max_tokens=40, temperature=0
    )
    assert r.choices[0].finish_reason == "stop"
    check_person(r.choices[0].message.content)
    # Sampled, a model may write JSON whitespace until max_tokens: compact JSON bounds it.
    r = oai.chat.completions.create(
        model=model,
        messages=PERSON,
        extra_body={"structured_outputs": COMPACT},
        max_tokens=40,
        temperature=1.0,
        seed=7,
        n=2,
    )
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason == "stop"
        check_person(c.message.content)


def test_json_schema_streamed_equals_schema(oai, model):
    stream = oai.chat.completions.create(
        model=model,
        messages=PERSON,
        response_format=RESPONSE_FORMAT,
        max_tokens=40,
        temperature=0,
        stream=True,
    )
    content, calls, finish = collect(stream)
    assert finish == ["stop"] and not calls
    check_person(content)


def test_json_object_is_json(oai, model):
    r = oai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Reply with an empty JSON object."}],
        response_format={"type": "json_object"},
        max_tokens=30,
        temperature=0,
    )
    text = r.choices[0].message.content
    assert text.lstrip().startswith(("{", "["))
    if r.choices[0].finish_reason == "stop":
        json.loads(text)


# ---------------------------------------------------------------- structured_outputs


def test_completions_regex_sampled_n2_and_streamed(oai, model):
    r = oai.completions.create(
        model=model,
        prompt="Call me at",
        extra_body={"structured_outputs": {"regex": REGEX}},
        max_tokens=20,
        temperature=1.0,
        n=2,
    )
    assert len(r.choices) == 2
    for c in r.choices:
        assert re.fullmatch(REGEX, c.text), c.text
        assert c.finish_reason == "stop"
    stream = oai.completions.create(
        model=model,
        prompt="Call me at",
        extra_body={"structured_outputs": {"regex": REGEX}},
        max_tokens=20,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert re.fullmatch(REGEX, text), text


def test_choice_and_grammar_on_completions_and_chat(oai, model):
    choices = ["Paris", "London", "Berlin"]
    r = oai.completions.create(
        model=model,
        prompt="The capital of France is",
        extra_body={"structured_outputs": {"choice": choices}},
        max_tokens=10,
        temperature=0,
    )
    assert r.choices[0].text in choices and r.choices[0].finish_reason == "stop"
    stream = oai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
        max_tokens=10,
        temperature=1.0,
        stream=True,
    )
    content, _, finish = collect(stream)
    assert content in ("yes", "no") and finish == ["stop"]
    r = oai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        extra_body={"structured_outputs": {"grammar": EBNF}},
        max_tokens=20,
        temperature=0,
    )
    assert re.fullmatch(r"The answer is (yes|no)\.", r.choices[0].message.content)


def test_json_schema_string_in_structured_outputs_and_whitespace_pattern(oai, model):
    r = oai.completions.create(
        model=model,
        prompt="A person as JSON:",
        extra_body={
            "structured_outputs": {"json": json.dumps(SCHEMA), "whitespace_pattern": "[ ]?"}
        },
        max_tokens=40,
        temperature=0,
    )
    text = r.choices[0].text
    check_person(text)
    assert "\n" not in text  # the pattern allows one space, never a newline


# ---------------------------------------------------------------- tools


def test_named_tool_call_streamed_and_not(oai, model):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r, (content, calls, finish) = answered_and_streamed(
        oai,
        model=model,
        messages=WEATHER,
        tools=TOOLS,
        tool_choice=choice,
        max_tokens=40,
        temperature=0,
    )
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0].function.name == "get_weather"
    check_call(msg.tool_calls[0])
    assert content == "" and finish == ["tool_calls"]
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == json.loads(msg.tool_calls[0].function.arguments)


def test_required_tool_calls_validate_sampled_and_streamed(oai, model):
    r = oai.chat.completions.create(
        model=model,
        messages=WEATHER,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=60,
        temperature=0.8,
        seed=3,
        n=2,
    )
    for c in r.choices:
        assert c.finish_reason == "tool_calls"
        assert len(c.message.tool_calls) == 1  # parallel_tool_calls false: one call
        check_call(c.message.tool_calls[0])
    stream = oai.chat.completions.create(
        model=model,
        messages=WEATHER,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    _, calls, finish = collect(stream)
    assert finish == ["tool_calls"] and calls
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), PARAMS[call["name"]])


def test_auto_tool_choice_reads_hermes_calls(oai, model):
    # The small model does not call tools by itself: a regex makes it write a hermes call.
    forced = r'<tool_call>\{"name": "add", "arguments": \{"a": [1-9], "b": [1-9]\}\}</tool_call>'
    kwargs = dict(
        model=model,
        messages=[{"role": "user", "content": "Add two numbers."}],
        tools=TOOLS,
        tool_choice="auto",
        max_tokens=80,
        temperature=0,
        extra_body={"structured_outputs": {"regex": forced}},
    )
    r, (content, calls, finish) = answered_and_streamed(oai, **kwargs)
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "add"
    check_call(call)
    assert finish == ["tool_calls"] and content == ""
    assert calls[0]["name"] == "add"
    assert json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments)
    # Without a call, auto answers with content.
    plain = dict(kwargs, extra_body={}, max_tokens=8)
    r = oai.chat.completions.create(**plain)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_multi_turn_with_a_tool_result(oai, model):
    messages = WEATHER + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "c"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"},
    ]
    r = oai.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0
    )
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 20  # the tool result went into the prompt


def test_top_logprobs_zero_without_logprobs(oai, model):
    r = oai.chat.completions.create(
        model=model, messages=WEATHER, max_tokens=2, top_logprobs=0, temperature=0
    )
    assert r.choices[0].logprobs is None


# ---------------------------------------------------------------- concurrency


def test_12_concurrent_requests_mixing_structured_and_plain(server, model):
    async def main() -> None:
        client = openai.AsyncOpenAI(**client_args(server))

        async def one(i: int) -> None:
            kind = i % 4
            if kind == 0:
                r = await client.chat.completions.create(
                    model=model,
                    messages=PERSON,
                    extra_body={"structured_outputs": COMPACT},
                    max_tokens=40,
                    temperature=0.7,
                    seed=i,
                )
                check_person(r.choices[0].message.content)
            elif kind == 1:
                r = await client.completions.create(
                    model=model,
                    prompt=f"Number {i}:",
                    max_tokens=20,
                    temperature=0.7,
                    extra_body={"structured_outputs": {"regex": REGEX}},
                )
                assert re.fullmatch(REGEX, r.choices[0].text)
            elif kind == 2:
                r = await client.chat.completions.create(
                    model=model,
                    messages=WEATHER,
                    tools=TOOLS,
                    tool_choice="required",
                    max_tokens=60,
                    temperature=0.7,
                    seed=i,
                )
                for call in r.choices[0].message.tool_calls:
                    check_call(call)
            else:
                r = await client.completions.create(
                    model=model, prompt=f"Story {i}:", max_tokens=6, temperature=0.7
                )
                assert r.choices[0].finish_reason == "length"

        await asyncio.gather(*(one(i) for i in range(12)))
        await client.close()

    asyncio.run(main())


# ---------------------------------------------------------------- bad input


BAD = [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "objekt"}},
            }
        },
        "response_format.json_schema.schema",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "integer", "multipleOf": 3}},
            }
        },
        "response_format.json_schema.schema.multipleOf",
    ),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    (
        {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
        "structured_outputs",
    ),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice.function.name",
    ),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}},
                }
            ],
            "tool_choice": "required",
        },
        "tools[0].function.parameters.uniqueItems",
    ),
    (
        {"tools": TOOLS, "tool_choice": "required", "response_format": RESPONSE_FORMAT},
        "tool_choice",
    ),
]


@pytest.mark.parametrize("extra, param", BAD)
def test_bad_input_is_a_400_naming_the_part(server, extra, param):
    with server.client() as http:
        r = http.post("/v1/chat/completions", json={"messages": WEATHER, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["code"] == 400
    assert err["message"]


# ---------------------------------------------------------------- the compile time limit, last


def test_slow_compile_fails_alone_while_others_finish(server, oai, model):
    async def main() -> list:
        client = openai.AsyncOpenAI(**client_args(server))
        slow = client.chat.completions.create(
            model=model,
            messages=PERSON,
            max_tokens=10,
            extra_body={"structured_outputs": {"json": SLOW_SCHEMA}},
        )
        plain = client.completions.create(model=model, prompt="Hi", max_tokens=4)
        quick = client.completions.create(
            model=model,
            prompt="Yes or no:",
            max_tokens=4,
            extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
        )
        out = await asyncio.gather(slow, plain, quick, return_exceptions=True)
        await client.close()
        return out

    slow, plain, quick = asyncio.run(main())
    assert isinstance(slow, openai.BadRequestError), slow
    assert "time limit" in slow.body["message"] and "1 s" in slow.body["message"]
    assert plain.choices[0].finish_reason == "length"
    assert quick.choices[0].text in ("yes", "no")
    # ... and the server goes on serving.
    r = oai.completions.create(model=model, prompt="Hello", max_tokens=2)
    assert r.choices[0].text


def test_every_kv_block_back_in_the_pool(server):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0:
            break
        time.sleep(0.5)
    assert m["vllm:num_requests_running"] == 0
    assert m["vllm:num_requests_waiting"] == 0
    assert m["vllm:kv_cache_usage_perc"] == 0
