"""The router's parts in one process: circuit breaker, backoff, prefix index, routing logics,
token bucket, canary verdicts, the continuation a failover sends, and the CLI's checks."""

from __future__ import annotations

import asyncio
import json
import os
import random
import tracemalloc

import httpx
import pytest

from router.admission import RateLimiter, TokenBucket
from router.backends import Backend, BackendPool, parse_load
from router.canary import CanaryMonitor
from router.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, backoff_delays
from router.config import BackendSpec, RouterConfig, parse_args, parse_backend
from router.metrics import RouterMetrics
from router.prefix_index import PrefixIndex
from router.proxy import Proxy, prefix_text
from router.routing import LeastLoaded, PrefixAware, RoundRobin, RouteInfo, Session
from router.stream import StreamState, can_failover


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_circuit_transitions():
    clock = Clock()
    cb = CircuitBreaker(failure_threshold=3, cooldown_s=10, clock=clock)
    assert cb.state == CLOSED and cb.acquire()
    cb.record_failure()
    cb.record_failure()
    assert cb.state == CLOSED
    cb.record_success()  # a success resets the count
    for _ in range(3):
        cb.record_failure()
    assert cb.state == OPEN and not cb.allows() and not cb.acquire()
    clock.t += 9.9
    assert cb.state == OPEN
    clock.t += 0.2
    assert cb.state == HALF_OPEN
    assert cb.acquire() and not cb.acquire()  # one probe at a time
    cb.record_failure()  # the probe failed: open again, a new cool-down
    assert cb.state == OPEN
    clock.t += 10
    assert cb.acquire()
    cb.record_success()
    assert cb.state == CLOSED and cb.acquire() and cb.acquire()
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(0)


def test_backoff_schedule_has_exponential_steps_jitter_and_cap():
    assert backoff_delays(4, 1.0, 8.0, rng=lambda: 0.5) == [1.0, 2.0, 4.0]
    assert backoff_delays(6, 1.0, 4.0, rng=lambda: 0.5) == [1.0, 2.0, 4.0, 4.0, 4.0]
    low, high = (
        backoff_delays(3, 1.0, 8.0, rng=lambda: 0.0),
        backoff_delays(3, 1.0, 8.0, rng=lambda: 0.999),
    )
    assert low == [0.75, 1.5] and all(h < 1.25 * d for h, d in zip(high, [1, 2], strict=True))
    draws = {tuple(backoff_delays(3)) for _ in range(20)}
    assert len(draws) > 1  # jittered


def _config(**kw) -> RouterConfig:
    return RouterConfig(backends=[BackendSpec("http://a:1"), BackendSpec("http://b:1")], **kw)


def test_retries_wait_the_backoff_schedule_then_give_the_last_5xx():
    """The proxy's retry loop with a fake clock: 500 from every backend, 3 tries."""
    calls, sleeps = [], []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return httpx.Response(500, json={"error": {"message": "boom", "code": 500}})

    async def run() -> tuple[int, bytes]:
        cfg = _config(max_tries=3, backoff_base=1.0, backoff_cap=8.0, circuit_failures=100)
        metrics = RouterMetrics()
        pool = BackendPool(cfg, metrics)
        proxy = Proxy(cfg, pool, RoundRobin(), metrics, CanaryMonitor())
        proxy.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))

        async def fake_sleep(s: float) -> None:
            sleeps.append(s)

        proxy.sleep = fake_sleep
        resp = await proxy.handle("/v1/completions", b'{"prompt": "x"}', {})
        await proxy.client.aclose()
        return resp.status_code, resp.body

    status, body = asyncio.run(run())
    assert status == 500 and json.loads(body)["error"]["message"] == "boom"
    assert len(calls) == 3 and calls[0] != calls[1]  # the retry goes to the other backend
    assert len(sleeps) == 2
    assert 0.75 <= sleeps[0] <= 1.25 and 1.5 <= sleeps[1] <= 2.5


def test_4xx_is_not_retried():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(400, json={"error": {"message": "bad", "code": 400}})

    async def run() -> int:
        cfg = _config()
        metrics = RouterMetrics()
        proxy = Proxy(cfg, BackendPool(cfg, metrics), RoundRobin(), metrics, CanaryMonitor())
        proxy.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        resp = await proxy.handle("/v1/completions", b"{}", {})
        await proxy.client.aclose()
        return resp.status_code

    assert asyncio.run(run()) == 400 and len(calls) == 1


def test_prefix_index_memory_stays_bounded_under_a_long_random_workload():
    idx = PrefixIndex(block_chars=16, max_blocks=500)
    rng = random.Random(0)
    backends = [f"http://10.0.0.{i}:8000" for i in range(4)]
    systems = ["".join(rng.choices("abcdefgh ", k=200)) for _ in range(5)]
    tracemalloc.start()
    peak_after_fill = None
    for i in range(3000):
        text = rng.choice(systems) + "".join(rng.choices("abcdefgh ", k=rng.randint(0, 300)))
        keys = idx.keys(text)
        b = rng.choice(backends)
        idx.record(keys, b, idx.match(keys, [b])[b])
        assert len(idx) <= 500
        if i == 500:
            peak_after_fill = tracemalloc.get_traced_memory()[0]
    now = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert now < peak_after_fill * 1.5 + 100_000  # no growth after the index is full
    assert now < 500 * 600  # a few hundred bytes a block


def test_prefix_index_match_and_forget():
    idx = PrefixIndex(block_chars=4, max_blocks=100)
    idx.record(idx.keys("aaaabbbbcccc"), "A")
    idx.record(idx.keys("aaaabbbbdddd"), "B")
    m = idx.match(idx.keys("aaaabbbbccccxxxx"), ["A", "B", "C"])
    assert m == {"A": 3, "B": 2, "C": 0}
    idx.forget("A")
    assert idx.match(idx.keys("aaaabbbbcccc"), ["A", "B"]) == {"A": 0, "B": 2}


def _backends(n: int) -> list[Backend]:
    return [Backend(f"http://10.0.0.{i}:8000") for i in range(n)]


def test_round_robin_weighted():
    bs = _backends(2)
    bs[0].weight = 2
    rr = RoundRobin()
    picks = [rr.choose(bs, RouteInfo())[0].url[-6] for _ in range(6)]
    assert picks.count("0") == 4 and picks.count("1") == 2
    assert picks[:3] != ["0", "0", "0"]  # smooth: interleaved


def test_least_loaded_uses_in_flight_and_scraped_queue():
    bs = _backends(2)
    ll = LeastLoaded(rng=random.Random(1))
    bs[0].in_flight = 5
    assert all(ll.choose(bs, RouteInfo())[0] is bs[1] for _ in range(10))
    bs[0].in_flight = 0
    bs[1].load, bs[1].scraped_at = {"waiting": 7.0, "kv_usage": 0.5}, 1e18  # fresh
    assert all(ll.choose(bs, RouteInfo())[0] is bs[0] for _ in range(10))
    bs[1].scraped_at = -1e9  # stale: ignored
    assert {ll.choose(bs, RouteInfo())[0].url for _ in range(40)} == {b.url for b in bs}


def test_session_is_sticky_and_consistent():
    bs = _backends(4)
    s = Session()
    first = {f"user-{i}": s.choose(bs, RouteInfo(session=f"user-{i}"))[0].url for i in range(200)}
    again = {k: s.choose(bs, RouteInfo(session=k))[0].url for k in first}
    assert first == again
    assert len(set(first.values())) == 4
    gone = bs[3].url
    moved = {k: s.choose(bs[:3], RouteInfo(session=k))[0].url for k in first}
    # only the sessions of the backend that left move
    assert all(moved[k] == v for k, v in first.items() if v != gone)
    b, reason = s.choose(bs, RouteInfo())
    assert reason == "no-session"


def test_prefix_aware_keeps_a_conversation_and_spreads_cold_traffic():
    bs = _backends(2)
    p = PrefixAware(PrefixIndex(block_chars=8, max_blocks=10_000), 4, 1.5, rng=random.Random(0))
    conv = [{"role": "system", "content": "You are helpful. " * 4},
            {"role": "user", "content": "Tell me about the sea and ships."}]  # fmt: skip
    # cold traffic: load counted at dispatch spreads a burst over both backends
    picks = []
    for i in range(10):
        info = RouteInfo(prefix_text({"prompt": f"{i:03d} cold prompt " * 3}))
        b, reason = p.choose(bs, info)
        assert reason == "cold"
        b.in_flight += 1
        p.record(b, info)
        picks.append(b)
    assert abs(picks.count(bs[0]) - picks.count(bs[1])) <= 1
    for b in bs:
        b.in_flight = 0
    info = RouteInfo(prefix_text({"messages": conv}))
    home, _ = p.choose(bs, info)
    p.record(home, info)
    for turn in range(3):  # the whole conversation is the prefix, turn after turn
        conv = conv + [{"role": "assistant", "content": f"answer {turn} " * 5},
                       {"role": "user", "content": f"question {turn}?"}]  # fmt: skip
        info = RouteInfo(prefix_text({"messages": conv}))
        b, reason = p.choose(bs, info)
        assert (b, reason) == (home, "prefix-hit")
        p.record(b, info)
    # the home replica overloaded by both gaps: the least-loaded one instead
    home.in_flight = 10
    b, reason = p.choose(bs, RouteInfo(prefix_text({"messages": conv})))
    assert b is not home and reason == "overloaded"
    assert p.index.hit_ratio > 0


def test_token_bucket_and_rate_limiter():
    clock = Clock()
    tb = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [tb.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert tb.take() == pytest.approx(0.5)
    clock.t += 0.5
    assert tb.take() == 0.0
    rl = RateLimiter(rate=0.5, burst=1)
    assert rl.retry_after("k") == 0 and rl.retry_after("k") == 2 and rl.retry_after("j") == 0
    assert RateLimiter(0, 1).retry_after("k") == 0  # off


def test_canary_verdicts():
    m = CanaryMonitor(window_s=60, min_requests=5, error_margin=0.1, latency_ratio=2.0)
    for _ in range(10):
        m.observe("stable", True, 0.1, now=0)
    for _ in range(4):
        m.observe("canary", False, 0.1, now=0)
    assert m.verdict(now=1) is None  # too few canary requests
    m.observe("canary", False, 0.1, now=0)
    assert "error rate" in m.verdict(now=1)
    assert m.verdict(now=100) is None  # out of the window
    m2 = CanaryMonitor(min_requests=3)
    for _ in range(5):
        m2.observe("stable", True, 0.1, now=0)
        m2.observe("canary", True, 0.5, now=0)
    assert "latency" in m2.verdict(now=1)
    bs = [Backend("http://s:1", group="stable"), Backend("http://c:1", group="canary")]
    m2.samples["stable"] = m2.samples["stable"].__class__(x for x in m2.samples["stable"])
    assert m2.check(bs) is None or bs[1].weight == 0.0


def test_continuation_bodies():
    body = {"prompt": "Hello", "max_tokens": 10, "stream": True, "temperature": 0, "echo": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    st = StreamState(body, chat=False, client_wants_ids=False)
    chunk = {"id": "c1", "created": 5, "model": "m",
             "choices": [{"index": 0, "text": "Hello world", "token_ids": [1, 2]}]}  # fmt: skip
    out = json.loads(st.absorb(chunk)[6:])
    assert "token_ids" not in out["choices"][0]  # the client did not ask for them
    ch = st.choices[0]
    exact, part = st.continuation(ch, exact=True)
    assert exact["continuation_token_ids"] == [1, 2] and exact["max_tokens"] == 8
    assert exact["prompt"] == "Hello" and "echo" not in exact and exact["temperature"] == 0
    assert part.indexes == {0: 0} and part.prompt_offset == 2
    text, _ = st.continuation(ch, exact=False)
    assert text["prompt"] == "Hello world" and "continuation_token_ids" not in text
    nxt = json.loads(st.absorb({"id": "c2", "created": 9, "choices": [
        {"index": 0, "text": "!", "token_ids": [3]}]}, part)[6:])  # fmt: skip
    assert nxt["id"] == "c1" and nxt["created"] == 5  # one stream to the client
    # the continuation's usage is swallowed; the whole request's comes at the end
    assert st.absorb({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1}},
                     part) is None  # fmt: skip
    assert st.wants_usage() and st.unknown_prompts() == []
    usage = json.loads(st.usage_chunk()[6:])["usage"]
    assert usage == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    chat = StreamState(
        {"messages": [{"role": "user", "content": "hi"}], "stream": True}, True, False
    )
    chat.absorb(
        {"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hey"}}]}
    )
    cont, cpart = chat.continuation(chat.choices[0], exact=False)
    assert cont["messages"][-1] == {"role": "assistant", "content": "Hey"}
    assert cont["continue_final_message"] is True and cont["add_generation_prompt"] is False
    assert chat.remaining_tokens(chat.choices[0]) is None and "max_tokens" not in cont
    role_again = chat.absorb(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}, cpart
    )
    assert role_again is None  # the continuation's role chunk is not repeated


def test_continuations_of_many_choices():
    """Two prompts, n=2: client indexes 0..3; each unfinished one continues on its own (one
    prompt, n=1, its own token ids), mapped back; a finished one stays finished."""
    body = {"prompt": ["A b", "C d"], "n": 2, "max_tokens": 5, "logprobs": 1, "stream": True,
            "best_of": 2, "stream_options": {"include_usage": True}}  # fmt: skip
    st = StreamState(body, chat=False, client_wants_ids=False)
    assert sorted(st.choices) == [0, 1, 2, 3] and st.choices[3].prompt == 1
    lp = {"tokens": ["x"], "token_logprobs": [-1.0], "top_logprobs": [{}], "text_offset": [0]}
    for i in range(4):
        st.absorb({"id": "c", "choices": [{"index": i, "text": f"t{i}", "token_ids": [i],
                                            "logprobs": lp | {"text_offset": [0]}}]})  # fmt: skip
    st.absorb({"choices": [{"index": 1, "text": "", "token_ids": [], "finish_reason": "stop"}]})
    assert [c.finished for c in st.choices.values()] == [False, True, False, False]
    cont, part = st.continuation(st.choices[3], exact=True)
    assert cont["prompt"] == "C d" and cont["n"] == 1 and "best_of" not in cont
    assert cont["continuation_token_ids"] == [3] and cont["max_tokens"] == 4
    assert cont["logprobs"] == 1 and part.indexes == {0: 3} and part.prompt == 1
    out = json.loads(st.absorb({"choices": [{"index": 0, "text": "u", "token_ids": [7],
                                             "logprobs": lp}]}, part)[6:])  # fmt: skip
    c = out["choices"][0]
    assert c["index"] == 3 and c["logprobs"]["text_offset"] == [2]  # after "t3"
    assert st.choices[3].text == "t3u" and st.choices[3].ids == [3, 7]
    st.absorb({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1}}, part)
    assert st.prompt_tokens == {1: 3} and st.unknown_prompts() == [0]
    assert st.tokenize_body(0) == {"prompt": "A b", "add_special_tokens": True}
    st.prompt_tokens[0] = 2
    usage = json.loads(st.usage_chunk()[6:])["usage"]
    assert usage == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    ids = StreamState({"prompt": [[1, 2], [3]], "echo": True}, False, False)
    assert ids.unknown_prompts() == [] and ids.prompt_tokens == {0: 2, 1: 1}
    ids.absorb({"choices": [{"index": 0, "text": "echoed prompt, then x", "token_ids": [9]}]})
    assert ids.continuation(ids.choices[0], exact=True)[0]["continuation_token_ids"] == [9]
    assert ids.continuation(ids.choices[0], exact=False) is None  # no ids to go on from
    assert not can_failover({"prompt": "x", "tools": [{}]})
    assert not can_failover({"prompt": "x", "response_format": {"type": "json_object"}})
    assert not can_failover({"prompt": "x", "n": 2, "best_of": 3})
    assert can_failover({"prompt": [[1], [2]], "n": 3})
    assert can_failover({"messages": [], "n": 2, "response_format": {"type": "text"}})


def test_prefix_text_counts_the_whole_conversation():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": [{"type": "text", "text": "c"}]}]  # fmt: skip
    t = prefix_text({"messages": msgs})
    assert "a" in t and "b" in t and t.endswith("c")
    assert prefix_text({"prompt": [1, 2]}) == "1 2" and prefix_text(b"junk") == ""


def test_parse_load():
    text = 'vllm:num_requests_waiting{model_name="m"} 3.0\nvllm:kv_cache_usage_perc{model_name="m"} 0.25\n'
    assert parse_load(text) == {"waiting": 3.0, "running": 0.0, "kv_usage": 0.25}


def test_config_errors():
    assert parse_backend("http://10.0.0.7:8000@10:canary") == BackendSpec(
        "http://10.0.0.7:8000", 10.0, "canary"
    )
    assert parse_backend("http://h:1/") == BackendSpec("http://h:1")
    for bad, msg in [("h:1", "http"), ("http://h:1@x", "weight"), ("http://h:1@1:blue", "group"),
                     ("http://h:1@-1", "non-negative")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            parse_backend(bad)
    with pytest.raises(ValueError, match="--backends"):
        RouterConfig()
    with pytest.raises(ValueError, match="HOST:PORT"):
        RouterConfig(backends_dns="nohost")
    with pytest.raises(SystemExit):
        parse_args(["--backends", "http://h:1", "--routing-logic", "random"])
    cfg, _ = parse_args(["--backends", "http://h:1", "--backend-api-key", "k1"])
    assert cfg.backend_headers() == {"authorization": "Bearer k1"}
    os.environ["ROUTER_BACKEND_API_KEY"] = "k2"
    try:
        assert parse_args(["--backends", "http://h:1"])[0].backend_api_key == "k2"
        assert (
            parse_args(["--backends", "http://h:1", "--backend-api-key", "k1"])[0].backend_api_key
            == "k1"
        )  # the flag wins
    finally:
        del os.environ["ROUTER_BACKEND_API_KEY"]
    assert parse_args(["--backends", "http://h:1"])[0].backend_headers() == {}
    with pytest.raises(SystemExit):
        parse_args(["--backends", "http://h:1", "--backend-api-key", ""])
    cfg, _ = parse_args(["--backends", "http://a:1,http://b:2@3:canary", "--session-key", "user"])
    assert [b.url for b in cfg.backends] == [
        "http://a:1",
        "http://b:2",
    ] and cfg.session_key == "user"
