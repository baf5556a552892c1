"""The OpenAI-compatible server end to end: `python -m frontend` on the default model, over HTTP
with httpx and with the official `openai` client."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]
GREEDY = {"temperature": 0.0}
API_KEY = "test-key-123"
VLLM_METRICS = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:num_preemptions_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(api_key=API_KEY)


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)


def stream(server, http: httpx.Client, path: str, body: dict) -> list:
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return server.sse_events(r.iter_lines())


def tokenize(http: httpx.Client, text: str) -> list[int]:
    r = http.post("/tokenize", json={"prompt": text})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


# ---------------------------------------------------------------- endpoints


def test_health_models_version(server, http):
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # no key needed
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == "SmolLM2-135M-Instruct" and card["object"] == "model"
    assert card["max_model_len"] > 0
    assert http.get("/version").json()["version"]


def test_completion_shape_and_usage(http):
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == "SmolLM2-135M-Instruct" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["text"] and choice["logprobs"] is None
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(tokenize(http, PROMPT))
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_shape_and_template(http):
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 12, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    # The prompt is the tokenizer's chat template with the generation prompt.
    templ = http.post("/tokenize", json={"messages": CHAT}).json()
    assert body["usage"]["prompt_tokens"] == templ["count"]
    text = http.post("/detokenize", json={"tokens": templ["tokens"]}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\n") and "Name three colors." in text


def test_tokenize_detokenize_round_trip(http):
    text = "Héllo wörld, 你好! 🙂"
    ids = tokenize(http, text)
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": text}


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streaming_equals_non_streaming_greedy(server, http, endpoint):
    # French and Chinese output: multi-byte UTF-8 split across tokens.
    if endpoint == "completions":
        path, body = "/v1/completions", {"prompt": "Voici une phrase en français :"}
    else:
        msgs = [{"role": "user", "content": "Écris une phrase en français avec des accents."}]
        path, body = "/v1/chat/completions", {"messages": msgs}
    body |= {"max_tokens": 20, **GREEDY, "stream_options": {"include_usage": True}}
    full = http.post(path, json=body).json()
    events = stream(server, http, path, body)
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    if endpoint == "completions":
        text = "".join(c["choices"][0]["text"] for c in chunks)
        expected = full["choices"][0]["text"]
        assert all(c["object"] == "text_completion" for c in chunks)
    else:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        expected = full["choices"][0]["message"]["content"]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert text == expected and "\ufffd" not in text
    assert len({c["id"] for c in chunks} | {usage_chunk["id"]}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full["usage"]


def test_streamed_text_equals_tokens_decoded_at_once(server, http):
    body = {"prompt": "Write in Chinese: 我喜欢", "max_tokens": 24, **GREEDY}
    body |= {"logprobs": 0, "return_tokens_as_token_ids": True}
    events = stream(server, http, "/v1/completions", body)
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    ids = [int(t.split(":")[1]) for e in events[:-1] for t in e["choices"][0]["logprobs"]["tokens"]]
    if events[-2]["choices"][0]["finish_reason"] == "stop":
        ids = ids[:-1]  # the EOS token has no text
    assert len(ids) >= 1
    assert text == http.post("/detokenize", json={"tokens": ids}).json()["prompt"]


def test_prompt_forms_and_n(http):
    ids = tokenize(http, PROMPT)
    as_text = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, **GREEDY})
    as_ids = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, **GREEDY})
    assert as_ids.json()["choices"][0]["text"] == as_text.json()["choices"][0]["text"]
    body = {"prompt": [PROMPT, "1, 2, 3,"], "max_tokens": 4, "n": 2, **GREEDY}
    r = http.post("/v1/completions", json=body).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in r["choices"]]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: both samples agree
    assert texts[0] == as_text.json()["choices"][0]["text"][: len(texts[0])]
    second = tokenize(http, "1, 2, 3,")
    assert r["usage"]["prompt_tokens"] == len(ids) + len(second)
    two_id_lists = {"prompt": [ids, second], "max_tokens": 4, **GREEDY}
    r2 = http.post("/v1/completions", json=two_id_lists).json()
    assert [c["text"] for c in r2["choices"]] == [texts[0], texts[2]]


def test_echo(http):
    r = http.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "echo": True, **GREEDY}
    )
    plain = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, **GREEDY})
    assert r.json()["choices"][0]["text"] == PROMPT + plain.json()["choices"][0]["text"]


def test_completion_logprobs(http):
    body = {"prompt": PROMPT, "max_tokens": 5, "logprobs": 3, "ignore_eos": True, **GREEDY}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    triples = zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True)
    for token, logprob, top in triples:
        assert logprob <= 0.0
        assert 3 <= len(top) <= 4  # the top 3, and the sampled token if not among them
        assert top[token] == logprob and max(top.values()) == logprob  # greedy: the argmax


def test_chat_logprobs(http):
    body = {"messages": CHAT, "max_tokens": 4, "logprobs": True, "top_logprobs": 2, **GREEDY}
    choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert 1 <= len(content) <= 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        tops = entry["top_logprobs"]
        assert len(tops) == 2 and tops[0]["logprob"] >= tops[1]["logprob"]
        assert tops[0]["token"] == entry["token"] and tops[0]["logprob"] == entry["logprob"]


def test_stop_strings_streamed_and_not(server, http):
    base = {"prompt": "List the days of the week: Monday,", "max_tokens": 24, **GREEDY}
    text = http.post("/v1/completions", json=base).json()["choices"][0]["text"]
    words = [w.strip(",.") for w in text.split()]
    stop = next(w for w in words[2:] if len(w) >= 3)
    expected = text[: text.find(stop)]
    r = http.post("/v1/completions", json={**base, "stop": [stop, "never-there"]}).json()
    assert r["choices"][0]["text"] == expected
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["stop_reason"] == stop
    events = stream(server, http, "/v1/completions", {**base, "stop": stop})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_seed_and_sampling_flags(http):
    body = {"messages": CHAT, "max_completion_tokens": 3, "ignore_eos": True, **GREEDY}
    r = http.post("/v1/chat/completions", json=body).json()
    assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "length"
    sampled = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 1234}
    sampled |= {"top_p": 0.9, "top_k": 50, "min_p": 0.01, "presence_penalty": 0.5}
    sampled |= {"frequency_penalty": 0.5, "repetition_penalty": 1.1, "min_tokens": 2}
    a = http.post("/v1/completions", json=sampled).json()["choices"][0]["text"]
    b = http.post("/v1/completions", json=sampled).json()["choices"][0]["text"]
    assert a == b  # same seed, same text
    # logit_bias: forbidding the greedy first token changes the first token.
    one = {"prompt": PROMPT, "max_tokens": 1, "logprobs": 0, "return_tokens_as_token_ids": True}
    first = http.post("/v1/completions", json={**one, **GREEDY}).json()["choices"][0]
    (name,) = first["logprobs"]["tokens"]
    banned = {**one, **GREEDY, "logit_bias": {name.split(":")[1]: -100}}
    again = http.post("/v1/completions", json=banned).json()["choices"][0]
    assert again["logprobs"]["tokens"] != [name]
    # stop_token_ids: the greedy first token as a stop token ends the request at once.
    stop_first = {**one, **GREEDY, "max_tokens": 5, "stop_token_ids": [int(name.split(":")[1])]}
    stopped = http.post("/v1/completions", json=stop_first).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["text"] == ""


def test_openai_client(oai):
    (model,) = oai.models.list().data
    c = oai.completions.create(model=model.id, prompt=PROMPT, max_tokens=6, temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens >= 1
    chat = oai.chat.completions.create(
        model=model.id, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=1
    )
    assert chat.choices[0].message.content and chat.choices[0].logprobs.content
    pieces = oai.chat.completions.create(
        model=model.id,
        messages=CHAT,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(pieces)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=model.id, prompt="x", max_tokens=1, temperature=-1)
    assert e.value.param == "temperature" and e.value.code == "400"


# ---------------------------------------------------------------- errors


LONG = "hello " * 9000
BAD_REQUESTS = [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b"", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"10": 500}}, "logit_bias"),
    ("/v1/completions", {"prompt": [10**9]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], "x"]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100_000}, "max_tokens"),
    ("/v1/completions", {"prompt": LONG, "max_tokens": 1}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    (
        "/v1/chat/completions",
        {"messages": CHAT, "max_completion_tokens": 10**6},
        "max_completion_tokens",
    ),
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
]


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS)
def test_invalid_requests_get_400_with_param(http, path, body, param):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["code"] == 400 and err["message"]
    assert err["param"] == param


def test_tokenizing_a_huge_prompt_does_not_stall_other_requests(server, http):
    huge = {"prompt": "hello world, this is a long text. " * 90_000, "max_tokens": 1}  # 3 MB

    def post_huge() -> httpx.Response:
        with server.client() as c:
            return c.post("/v1/completions", json=huge)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        big = pool.submit(post_huge)
        time.sleep(0.3)  # the upload is read, tokenizing has begun
        answered = 0  # /health calls begun and answered while the huge request was in flight
        while not big.done():
            assert http.get("/health").status_code == 200
            answered += not big.done()
            time.sleep(0.05)
        r = big.result()
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # over the context
    # Counted, not timed: were the event loop busy tokenizing, the first /health would be
    # answered only once the tokenizing ended, with the huge request's reply right behind it.
    # A slower machine tokenizes longer and answers more of them, never fewer.
    assert answered >= 5, answered


def test_unknown_model_route_and_method(http):
    r = http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert "gpt-9" in r.json()["error"]["message"]
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    assert http.get("/v1/completions").status_code == 405


def test_auth_required_except_health(server):
    with httpx.Client(base_url=server.base_url) as c:
        for method, path in [
            ("GET", "/v1/models"),
            ("POST", "/v1/completions"),
            ("GET", "/metrics"),
        ]:
            r = c.request(method, path, json={"prompt": "x"})
            assert r.status_code == 401 and r.json()["error"]["code"] == 401
        bad = c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401
        assert c.get("/health").status_code == 200


def test_32_concurrent_streams(server):
    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, dict]:
        body = {"prompt": f"Count from {i}:", "max_tokens": 16, "ignore_eos": True, **GREEDY}
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = server.sse_events([line async for line in r.aiter_lines()])
        assert events[-1] == "[DONE]"
        text = "".join(e["choices"][0]["text"] for e in events[:-2])
        return text, events[-2]["usage"]

    async def run() -> list:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(
            base_url=server.base_url, headers=server.headers, timeout=300, limits=limits
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run())
    assert len(results) == 32
    assert all(text and u["completion_tokens"] == 16 for text, u in results)


def test_disconnect_aborts_and_frees_kv_blocks(server, http):
    before = server.metrics()
    assert before["vllm:num_requests_running"] == 0
    body = {"prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with server.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines, got = r.iter_lines(), 0  # keep the iterator: dropping it closes the stream
        while got < 3:
            got += next(lines).startswith("data: ")
        during = server.metrics()
        assert during["vllm:num_requests_running"] == 1
        assert during["vllm:kv_cache_usage_perc"] > 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        after = server.metrics()
        if after["vllm:num_requests_running"] == 0 and after["vllm:kv_cache_usage_perc"] == 0:
            break
        time.sleep(0.1)
    assert after["vllm:num_requests_running"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0


def test_disconnect_during_a_non_streamed_request_aborts_it(server):
    body = {"prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True}

    def post_and_give_up() -> None:  # the read times out, and the client closes the connection
        with server.client(timeout=httpx.Timeout(5.0, read=4.0)) as c:
            c.post("/v1/completions", json=body)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        gave_up = pool.submit(post_and_give_up)
        deadline = time.monotonic() + 4
        while server.metrics()["vllm:num_requests_running"] != 1:
            assert time.monotonic() < deadline, "the request never ran"
            time.sleep(0.05)
        with pytest.raises(httpx.ReadTimeout):
            gave_up.result()
    deadline = time.monotonic() + 5
    while server.metrics()["vllm:num_requests_running"] != 0:
        assert time.monotonic() < deadline, "the abandoned request kept running"
        time.sleep(0.1)
    assert server.metrics()["vllm:kv_cache_usage_perc"] == 0


def test_metrics_names_and_counts(server, http):
    before = server.metrics()
    body = {"prompt": PROMPT, "max_tokens": 7, "ignore_eos": True, **GREEDY}
    r = http.post("/v1/completions", json=body).json()
    after = server.metrics()
    for name in VLLM_METRICS:
        assert any(k == name or k.startswith(name + "_") for k in after), name
    gen = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert gen == 7
    prompt = after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"]
    assert prompt == r["usage"]["prompt_tokens"]
    ttft = "vllm:time_to_first_token_seconds_count"
    assert after[ttft] - before[ttft] == 1
    assert after["vllm:e2e_request_latency_seconds_count"] > before.get(
        "vllm:e2e_request_latency_seconds_count", 0
    )
    assert after["vllm:prefix_cache_queries_total"] >= before["vllm:prefix_cache_queries_total"]


def test_idle_server_uses_under_one_percent_of_a_core(server, http):
    http.get("/health")
    time.sleep(1.0)  # let the last request's work settle
    c0, t0 = server.cpu_seconds(), time.monotonic()
    time.sleep(5.0)
    used = (server.cpu_seconds() - c0) / (time.monotonic() - t0)
    assert used < 0.01, f"idle server and engine core used {used:.2%} of a core"
