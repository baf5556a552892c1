"""The server's pieces without a server: request validation, response shapes, the command line
and the metrics page (fast: no model, no process)."""

from __future__ import annotations

import json

import pytest

from engine_core.protocol import SchedulerStats
from frontend.cli import parse_args
from frontend.metrics import Metrics
from frontend.openai_chat import (
    ChatCompletionRequest,
    chat_logprobs,
    chat_messages,
    check_chat_unsupported,
)
from frontend.openai_completions import CompletionRequest, completion_logprobs, completion_prompts
from frontend.openai_protocol import RequestError, choice, error_body, parse_request, token_namer
from frontend.openai_sampling import sampling_params
from frontend.outputs import CompletionOutput, FinishedRequestStats, IterationStats, Logprob

VOCAB = 1000


def completion(**fields) -> CompletionRequest:
    return parse_request(json.dumps(fields).encode(), CompletionRequest)


def chat(**fields) -> ChatCompletionRequest:
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    return parse_request(json.dumps(fields).encode(), ChatCompletionRequest)


def refused(fn, *args, **kwargs) -> RequestError:
    with pytest.raises(RequestError) as e:
        fn(*args, **kwargs)
    return e.value


@pytest.mark.parametrize(
    "body,param",
    [
        (b"{oops", None),
        (b"", None),
        (b"[1, 2]", None),
        (b'{"prompt": "x", "max_tokens": "5"}', "max_tokens"),
        (b'{"prompt": "x", "max_tokens": 2.5}', "max_tokens"),
        (b'{"prompt": "x", "n": true}', "n"),
        (
            b'{"prompt": "x", "stream_options": {"include_usage": 1}}',
            "stream_options.include_usage",
        ),
        (b'{"prompt": "x", "logit_bias": {"5": "high"}}', "logit_bias"),
    ],
)
def test_malformed_bodies_and_wrong_types_name_the_field(body, param):
    err = refused(parse_request, body, CompletionRequest)
    assert err.status == 400 and err.param == param and err.message


def test_unknown_fields_are_ignored_as_openai_clients_send_extras():
    req = completion(prompt="x", some_future_field={"a": 1})
    assert req.prompt == "x"


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("hello", ["hello"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_prompt_forms(prompt, expected):
    assert completion_prompts(completion(prompt=prompt)) == expected


@pytest.mark.parametrize("prompt", [[], [[]], [1, "a"], [[1], ["a"]], [True, 2], {"a": 1}, None])
def test_bad_prompt_forms_are_400_on_prompt(prompt):
    if isinstance(prompt, dict):
        err = refused(completion, prompt=prompt)
    else:
        err = refused(completion_prompts, completion(prompt=prompt))
    assert err.param == "prompt"


def test_sampling_params_carry_every_field():
    req = completion(
        prompt="x",
        n=2,
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=3,
        stop="END",
        stop_token_ids=[5],
        presence_penalty=0.1,
        frequency_penalty=0.2,
        repetition_penalty=1.3,
        logit_bias={"12": -5},
        ignore_eos=True,
        min_tokens=2,
        logprobs=4,
    )
    sp = sampling_params(req, prompt_len=10, max_model_len=100, vocab_size=VOCAB)
    assert (sp.n, sp.max_tokens, sp.temperature, sp.top_p, sp.top_k) == (2, 7, 0.5, 0.9, 40)
    assert (sp.min_p, sp.seed, sp.stop, sp.stop_token_ids) == (0.05, 3, ["END"], [5])
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (0.1, 0.2, 1.3)
    assert sp.logit_bias == {12: -5.0} and sp.ignore_eos and sp.min_tokens == 2
    assert sp.logprobs == 4


def test_defaults_completions_16_tokens_chat_the_rest_of_the_context():
    assert sampling_params(completion(prompt="x"), 10, 100, VOCAB).max_tokens == 16
    assert sampling_params(chat(), 10, 100, VOCAB).max_tokens == 90
    assert sampling_params(chat(max_tokens=5), 10, 100, VOCAB).max_tokens == 5
    assert (
        sampling_params(chat(max_completion_tokens=6, max_tokens=5), 10, 100, VOCAB).max_tokens == 6
    )
    chat_lp = sampling_params(chat(logprobs=True, top_logprobs=3), 10, 100, VOCAB)
    assert chat_lp.logprobs == 3
    assert sampling_params(chat(logprobs=True), 10, 100, VOCAB).logprobs == 0
    assert sampling_params(chat(), 10, 100, VOCAB).logprobs is None


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5000": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"stop_token_ids": [VOCAB]}, "stop_token_ids"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"suffix": "tail"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"echo": True, "logprobs": 1}, "echo"),
    ],
)
def test_out_of_range_values_are_400_naming_the_param(fields, param):
    err = refused(sampling_params, completion(prompt="x", **fields), 10, 100, VOCAB)
    assert err.status == 400 and err.param == param


def test_context_length_is_checked_with_the_prompt():
    err = refused(sampling_params, completion(prompt="x", max_tokens=91), 10, 100, VOCAB)
    assert err.param == "max_tokens" and "100 tokens" in err.message and "101" in err.message
    assert sampling_params(completion(prompt="x", max_tokens=90), 10, 100, VOCAB).max_tokens == 90
    err = refused(sampling_params, chat(), 100, 100, VOCAB)
    assert err.param == "messages"
    err = refused(sampling_params, chat(max_completion_tokens=95), 10, 100, VOCAB)
    assert err.param == "max_completion_tokens"
    assert refused(sampling_params, completion(prompt="x"), 0, 100, VOCAB).param == "prompt"


def test_chat_messages_text_parts_and_roles():
    req = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": None},
        ]
    )
    assert chat_messages(req.messages) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    ]
    assert refused(chat_messages, []).param == "messages"
    bad_role = chat(messages=[{"role": "function", "content": "x"}])
    assert refused(chat_messages, bad_role.messages).param == "messages[0].role"
    no_call_id = chat(messages=[{"role": "tool", "content": "x"}])
    assert refused(chat_messages, no_call_id.messages).param == "messages[0].tool_call_id"
    image = chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    assert refused(chat_messages, image.messages).param == "messages[0].content[0]"
    no_content = chat(messages=[{"role": "user"}])
    assert refused(chat_messages, no_content.messages).param == "messages[0].content"


def test_top_logprobs_without_logprobs_is_refused_unless_zero():
    assert refused(check_chat_unsupported, chat(top_logprobs=2)).param == "top_logprobs"
    check_chat_unsupported(chat(response_format={"type": "text"}, logprobs=True, top_logprobs=2))
    # As vLLM: top_logprobs 0 with logprobs false or absent asks for nothing.
    check_chat_unsupported(chat(top_logprobs=0))
    check_chat_unsupported(chat(top_logprobs=0, logprobs=False))


def test_error_body_is_openai_shaped():
    body = error_body("bad", 400, "top_p")
    assert body == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "top_p", "code": 400}
    }
    assert RequestError("x", 503).body()["error"]["type"] == "service_unavailable_error"


def _entry(sampled: int, top: list[tuple[int, float]], sampled_lp: float, rank: int) -> dict:
    # As the OutputProcessor builds them: the sampled token first, then the top-k by rank.
    entry = {sampled: Logprob(sampled_lp, rank, f"<{sampled}>")}
    for r, (tid, lp) in enumerate(top, 1):
        entry.setdefault(tid, Logprob(lp, r, f"<{tid}>"))
    return entry


def test_logprob_shapes():
    ids = [7, 8]
    lps = [
        _entry(7, [(7, -0.1), (9, -2.0)], -0.1, 1),
        _entry(8, [(3, -0.5), (4, -1.0)], -float("inf"), 50),
    ]
    name = token_namer(lambda ids: "?")
    comp = completion_logprobs(ids, lps, name, text_offset=5, top_k=2)
    assert comp["tokens"] == ["<7>", "<8>"]
    assert comp["token_logprobs"] == [-0.1, -9999.0]  # -inf is clamped: JSON has no infinity
    assert comp["top_logprobs"][0] == {"<7>": -0.1, "<9>": -2.0}
    assert comp["top_logprobs"][1] == {"<8>": -9999.0, "<3>": -0.5, "<4>": -1.0}
    assert comp["text_offset"] == [5, 8]
    c = chat_logprobs(ids, lps, name, top_k=2)["content"]
    assert c[0] == {
        "token": "<7>",
        "logprob": -0.1,
        "bytes": list(b"<7>"),
        "top_logprobs": [
            {"token": "<7>", "logprob": -0.1, "bytes": list(b"<7>")},
            {"token": "<9>", "logprob": -2.0, "bytes": list(b"<9>")},
        ],
    }
    assert [t["token"] for t in c[1]["top_logprobs"]] == ["<3>", "<4>"]
    as_ids = completion_logprobs(ids, lps, token_namer(None, as_ids=True), 0, 2)
    assert as_ids["tokens"] == ["token_id:7", "token_id:8"]


def test_choice_shapes():
    out = CompletionOutput(1, "hi", [5], None, None, "stop", "END")
    assert choice(False, 3, "hi", None, out, chunk=False) == {
        "index": 3,
        "text": "hi",
        "logprobs": None,
        "finish_reason": "stop",
        "stop_reason": "END",
    }
    assert choice(True, 1, "hi", None, out, chunk=False)["message"] == {
        "role": "assistant",
        "content": "hi",
    }
    assert choice(True, 1, "hi", None, out, chunk=True)["delta"] == {"content": "hi"}
    assert choice(True, 1, "", None, out, chunk=True)["delta"] == {}


def test_command_line_uses_vllm_flag_names():
    config, server = parse_args(
        [
            "--model", "/m.gguf", "--port", "9000", "--api-key", "k", "--served-model-name", "m",
            "--tensor-parallel-size", "2", "--max-num-seqs", "8", "--max-num-batched-tokens", "512",
            "--max-model-len", "1024", "--block-size", "32", "--no-enable-prefix-caching",
            "--dtype", "float32", "--max-queue-len", "4",
        ]
    )  # fmt: skip
    assert (config.model, config.tensor_parallel_size, config.max_num_seqs) == ("/m.gguf", 2, 8)
    assert (config.max_num_batched_tokens, config.max_model_len, config.block_size) == (
        512,
        1024,
        32,
    )
    assert config.enable_prefix_caching is False and config.dtype == "float32"
    assert (server.host, server.port, server.api_key) == ("127.0.0.1", 9000, "k")
    assert (server.served_model_name, server.max_queue_len) == ("m", 4)
    defaults, server = parse_args([])
    assert defaults.enable_prefix_caching is True and server.host == "127.0.0.1"
    # A server's step budget: 1024 tokens on a CPU, vLLM's 2048 on a GPU (config.py says why).
    assert defaults.usage_context == "server" and defaults.max_num_batched_tokens is None
    assert defaults.resolved_max_num_batched_tokens(on_cpu=True) == 1024
    assert defaults.resolved_max_num_batched_tokens(on_cpu=False) == 2048
    assert config.resolved_max_num_batched_tokens(on_cpu=True) == 512  # the flag wins
    assert server.port == 8000 and server.api_key is None and server.max_queue_len is None


@pytest.mark.parametrize(
    "argv,word",
    [
        (["--block-size", "24"], "block_size"),
        (["--max-num-seqs", "0"], "max_num_seqs"),
        (["--port", "70000"], "port"),
        (["--max-queue-len", "-1"], "max_queue_len"),
        (["--api-key", ""], "api_key"),
        (["--dtype", "int3"], "--dtype"),
        (["--max-num-batched-tokens", "0"], "max_num_batched_tokens"),
    ],
)
def test_bad_command_line_values_exit_naming_them(argv, word, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and word in capsys.readouterr().err


def test_metrics_page_has_vllm_names_and_counts():
    m = Metrics("tiny", max_model_len=100)
    m.observe_scheduler(
        SchedulerStats(num_running_reqs=3, num_waiting_reqs=2, kv_cache_usage=0.25,
                       prefix_cache_queries=40, prefix_cache_hits=16, num_preemptions=1)
    )  # fmt: skip
    fin = FinishedRequestStats("r", "length", 12, 5, 1.5, 0.2, 0.2, 1.0, 0.25)
    m.observe_iteration(
        IterationStats(12, 5, [0.2], [0.05, 0.06], [fin]),
    )
    page = m.render().decode()
    lines = dict(line.rsplit(" ", 1) for line in page.splitlines() if not line.startswith("#"))
    label = '{model_name="tiny"}'
    assert float(lines[f"vllm:num_requests_running{label}"]) == 3
    assert float(lines[f"vllm:num_requests_waiting{label}"]) == 2
    assert float(lines[f"vllm:kv_cache_usage_perc{label}"]) == 0.25
    assert float(lines[f"vllm:prompt_tokens_total{label}"]) == 12
    assert float(lines[f"vllm:generation_tokens_total{label}"]) == 5
    assert float(lines[f"vllm:num_preemptions_total{label}"]) == 1
    assert float(lines[f"vllm:prefix_cache_queries_total{label}"]) == 40
    assert float(lines[f"vllm:prefix_cache_hits_total{label}"]) == 16
    assert float(lines[f"vllm:time_to_first_token_seconds_count{label}"]) == 1
    assert float(lines[f"vllm:inter_token_latency_seconds_count{label}"]) == 2
    assert float(lines[f"vllm:e2e_request_latency_seconds_sum{label}"]) == 1.5
    assert float(lines[f"vllm:request_queue_time_seconds_count{label}"]) == 1
    success = 'vllm:request_success_total{finished_reason="length",model_name="tiny"}'
    assert float(lines[success]) == 1
    assert "_created" not in page
