"""The router as a process in front of fake backends: proxying, 4xx pass-through, retries,
circuit breaking, auth, rate limit and queueing, canary rollback, DNS discovery."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.router.conftest import Fake, RouterProc, wait_for

pytestmark = pytest.mark.slow  # each test starts a router and fake backends: seconds apiece
FAST = ["--health-interval", "0.2", "--backoff-base", "0.05", "--backoff-cap", "0.2"]


def backends(*fakes: Fake) -> list[str]:
    return ["--backends", ",".join(f.url for f in fakes)]


def sse_text(r: httpx.Response) -> tuple[str, list]:
    text, events = "", []
    for line in r.iter_lines():
        if line.startswith("data: "):
            d = line[6:]
            events.append(d)
            if d != "[DONE]":
                obj = json.loads(d)
                for c in obj.get("choices", []):
                    text += c.get("text") or (c.get("delta") or {}).get("content") or ""
    return text, events


def test_proxy_models_and_stream(procs):
    a, b = procs(Fake("a")), procs(Fake("b"))
    r = procs(RouterProc(*backends(a, b), "--routing-logic", "round-robin", *FAST))
    c = httpx.Client(base_url=r.url, timeout=30)
    got = [
        c.post("/v1/completions", json={"prompt": "x y", "max_tokens": 2}).json() for _ in range(4)
    ]
    names = [g["backend"] for g in got]
    assert set(names) == {"a", "b"} and names[:2] == names[2:]  # round-robin: a b a b
    assert got[0]["choices"][0]["text"] == " w2 w3"
    ids = sorted(m["id"] for m in c.get("/v1/models").json()["data"])
    assert ids == ["model-a", "model-b"]  # the union
    with c.stream("POST", "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 3, "stream": True,
    }) as resp:  # fmt: skip
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        text, events = sse_text(resp)
    assert text == " w3 w4 w5" and events[-1] == "[DONE]"
    assert c.get("/health").status_code == 200
    m = r.metrics()
    assert m["vllm:healthy_pods_total"] == 2
    assert m[f'vllm:num_incoming_requests_total{{server="{a.url}"}}'] >= 2
    assert f'router_request_latency_seconds_count{{backend="{b.url}"}}' in m


def test_4xx_passed_through_never_retried(procs):
    a, b = procs(Fake("a")), procs(Fake("b"))
    r = procs(RouterProc(*backends(a, b), *FAST))
    for f in (a, b):
        f.control(mode="400")
    resp = httpx.post(r.url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    assert resp.status_code == 400
    assert resp.json() == {"error": {"message": "Invalid max_tokens.", "type": "invalid_request_error",
                                     "param": "max_tokens", "code": 400}}  # fmt: skip
    assert a.hits() + b.hits() == 1
    assert r.metrics()["router_retries_total"] == 0


@pytest.mark.parametrize("mode", ["500", "garbage", "hang", "refused"])
def test_failure_before_first_byte_is_retried_elsewhere(procs, mode):
    a, b = procs(Fake("a")), procs(Fake("b"))
    extra = ["--first-byte-timeout", "1"] if mode == "hang" else []
    r = procs(RouterProc(*backends(a, b), "--routing-logic", "round-robin", *FAST, *extra))
    if mode == "refused":
        a.stop()
    else:
        a.control(mode=mode)
    c = httpx.Client(base_url=r.url, timeout=30)
    for stream in (False, True):
        body = {"prompt": "x", "max_tokens": 2, "stream": stream}
        for _ in range(2):  # one of the two goes to `a` first
            resp = c.post("/v1/completions", json=body)
            assert resp.status_code == 200, resp.text
            assert (" w1 w2" in resp.text) if not stream else ("w1" in resp.text)
    m = r.metrics()
    if mode != "refused":  # a refused backend may be marked down by the probes first
        assert m["router_retries_total"] >= 1
        assert m[f'vllm:request_errors_total{{server="{a.url}"}}'] >= 1


def test_circuit_opens_then_half_open_then_closes(procs):
    a, b = procs(Fake("a")), procs(Fake("b"))
    r = procs(RouterProc(*backends(a, b), "--routing-logic", "round-robin", *FAST,
                         "--circuit-failures", "2", "--circuit-cooldown", "1"))  # fmt: skip
    a.control(mode="500")
    key = f'router_circuit_state{{backend="{a.url}"}}'
    c = httpx.Client(base_url=r.url, timeout=30)
    for _ in range(4):
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 200
    assert r.metrics()[key] in (1, 2)  # open, or already half-open after the cool-down
    hits = a.hits()
    a.control(mode="ok")
    wait_for(lambda: r.metrics()[key] == 1, what="half-open")
    for _ in range(4):
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 200
    assert a.hits() > hits  # the half-open probe went through
    assert r.metrics()[key] == 0


def test_all_5xx_gives_the_last_backend_error(procs):
    a = procs(Fake("a"))
    r = procs(RouterProc(*backends(a), *FAST, "--max-tries", "2"))
    a.control(mode="503")
    resp = httpx.post(r.url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == 503
    assert a.hits() == 2


def test_auth(procs):
    a = procs(Fake("a"))
    r = procs(RouterProc(*backends(a), "--api-key", "sekrit", "--admin-key", "adm", *FAST))
    resp = httpx.post(r.url + "/v1/completions", json={"prompt": "x"})
    assert resp.status_code == 401
    assert resp.json()["error"]["type"] == "authentication_error"
    assert resp.headers["www-authenticate"] == "Bearer"
    bad = httpx.get(r.url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    assert httpx.get(r.url + "/health").status_code == 200  # no key needed
    ok = httpx.post(r.url + "/v1/completions", json={"prompt": "x"},
                    headers={"Authorization": "Bearer sekrit"}, timeout=30)  # fmt: skip
    assert ok.status_code == 200
    adm = httpx.post(r.url + "/admin/weights", json={"weights": {a.url: 2}},
                     headers={"Authorization": "Bearer sekrit"})  # fmt: skip
    assert adm.status_code == 401  # the API key is not the admin key


def test_rate_limit_429(procs):
    a = procs(Fake("a"))
    r = procs(RouterProc(*backends(a), "--rate-limit", "0.2", "--rate-burst", "2", *FAST))
    codes = []
    for _ in range(4):
        resp = httpx.post(r.url + "/v1/completions", json={"prompt": "x"}, timeout=30)
        codes.append(resp.status_code)
    assert codes[:2] == [200, 200] and 429 in codes[2:]
    resp = httpx.post(r.url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    assert resp.status_code == 429
    assert int(resp.headers["retry-after"]) >= 1
    assert resp.json()["error"]["type"] == "rate_limit_error"
    other = httpx.post(r.url + "/v1/completions", json={"prompt": "x"},
                       headers={"Authorization": "Bearer other"}, timeout=30)  # fmt: skip
    assert other.status_code == 200  # a bucket per key


def test_requests_wait_while_all_backends_are_down(procs):
    a = procs(Fake("a"))
    r = procs(RouterProc(*backends(a), *FAST, "--queue-timeout", "30"))
    a.control(health=503)
    wait_for(lambda: r.metrics()["vllm:healthy_pods_total"] == 0, what="marked down")
    with httpx.Client(base_url=r.url, timeout=60) as c:
        import threading

        out = {}
        t = threading.Thread(
            target=lambda: out.update(r=c.post("/v1/completions", json={"prompt": "x"}))
        )
        t.start()
        wait_for(lambda: r.metrics()["router_queue_depth"] == 1, what="queued")
        a.control(health=200)
        t.join(60)
    assert out["r"].status_code == 200


def test_queue_full_and_queue_timeout(procs):
    a = procs(Fake("a"))
    r = procs(RouterProc(*backends(a), *FAST, "--queue-timeout", "0.5", "--max-queue", "0"))
    a.control(health=503)
    wait_for(lambda: r.metrics()["vllm:healthy_pods_total"] == 0, what="marked down")
    resp = httpx.post(r.url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
    r2 = procs(RouterProc(*backends(a), *FAST, "--queue-timeout", "0.5"))
    wait_for(lambda: r2.metrics()["vllm:healthy_pods_total"] == 0, what="marked down")
    resp = httpx.post(r2.url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    assert resp.status_code == 503 and "within 0.5 s" in resp.json()["error"]["message"]


def test_text_failover_mid_stream_on_other_servers(procs):
    """Fakes are not ours: the continuation is the prompt plus the text so far."""
    a, b = procs(Fake("a")), procs(Fake("b"))
    r = procs(RouterProc(*backends(a, b), "--routing-logic", "round-robin", *FAST))
    a.control(mode="exit_after", after=3, delay=0.05)
    b.control(mode="exit_after", after=3, delay=0.05)
    for path, body in [
        ("/v1/completions", {"prompt": "p q", "max_tokens": 6, "stream": True}),
    ]:
        with httpx.stream("POST", r.url + path, json=body, timeout=30) as resp:
            text, events = sse_text(resp)
    # a dies after 3 pieces; b goes on from the text and dies after 3 more (its budget's end).
    assert text == " w2 w3 w4 w5 w6 w7", text
    assert events[-1] == "[DONE]"
    assert r.metrics()["router_failovers_total"] == 1


def _by_choice(r: httpx.Response) -> tuple[dict[int, str], list[dict], list[str]]:
    texts: dict[int, str] = {}
    usages, events = [], []
    for line in r.iter_lines():
        if line.startswith("data: "):
            events.append(line[6:])
            if line[6:] != "[DONE]":
                obj = json.loads(line[6:])
                assert "error" not in obj, obj
                usages += [obj["usage"]] if obj.get("usage") else []
                for c in obj["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + (c.get("text") or "")
    return texts, usages, events


def test_text_failover_of_many_choices_and_usage(procs):
    """Two prompts, n=2: each choice continues from its own text on the other server; one
    usage for the whole request, also when the server died after the last token (then the
    prompts are counted with /tokenize)."""
    a, b = procs(Fake("a")), procs(Fake("b"))
    r = procs(RouterProc(*backends(a, b), "--routing-logic", "round-robin", *FAST))
    body = {"prompt": ["p q", "r s t"], "n": 2, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    want = {0: " w2 w3 w4 w5 w6 w7", 1: " w2 w3 w4 w5 w6 w7",
            2: " w3 w4 w5 w6 w7 w8", 3: " w3 w4 w5 w6 w7 w8"}  # fmt: skip
    for mode in ("exit_after", "exit_before_usage"):
        for f in (a, b):
            f.control(mode=mode, after=3, delay=0.05)
        with httpx.stream("POST", r.url + "/v1/completions", json=body, timeout=30) as resp:
            texts, usages, events = _by_choice(resp)
        assert texts == want, (mode, texts)
        assert usages == [{"prompt_tokens": 5, "completion_tokens": 24, "total_tokens": 29}]
        assert events[-1] == "[DONE]"
        for f in (a, b):  # the one that died comes back for the next round
            if f.proc.poll() is not None:
                f.stop()
                f.__init__(f.name, port=f.port)
                f.wait_ready()
        wait_for(lambda: r.metrics()["vllm:healthy_pods_total"] == 2, what="both up")
    assert r.metrics()["router_failovers_total"] == 1  # the second: nothing left to continue


def test_chat_text_failover(procs):
    a, b = procs(Fake("a")), procs(Fake("b"))
    r = procs(RouterProc(*backends(a, b), "--routing-logic", "round-robin", *FAST))
    a.control(mode="exit_after", after=2, delay=0.05)
    body = {"messages": [{"role": "user", "content": "u v w"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", r.url + "/v1/chat/completions", json=body, timeout=30) as resp:
        text, _ = sse_text(resp)
    assert text == " w3 w4 w5 w6 w7", text  # b saw the assistant's " w3 w4" as the last message


def test_canary_rollback_and_admin_weights(procs):
    s, k = procs(Fake("stable")), procs(Fake("canary"))
    r = procs(RouterProc("--backends", f"{s.url}@1:stable,{k.url}@1:canary", "--admin-key", "adm",
                         "--routing-logic", "round-robin", "--canary-min-requests", "4",
                         # The canary's 500s must not also open its circuit: this test is
                         # about the canary monitor and the weights (the breaker has its own).
                         "--circuit-failures", "1000", *FAST))  # fmt: skip
    k.control(mode="500")  # the client never sees it (retried on stable), the monitor does
    adm = {"Authorization": "Bearer adm"}
    c = httpx.Client(base_url=r.url, timeout=30)
    for _ in range(10):
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 200
    wait_for(
        lambda: c.get("/admin/state", headers=adm).json()["canary_rolled_back"], what="rollback"
    )
    st = c.get("/admin/state", headers=adm).json()
    assert {b["group"]: b["weight"] for b in st["backends"]} == {"stable": 1.0, "canary": 0.0}
    hits = k.hits()
    for _ in range(4):
        assert c.post("/v1/completions", json={"prompt": "x"}).json()["backend"] == "stable"
    assert k.hits() == hits
    k.control(mode="ok")
    assert c.post("/admin/weights", json={"weights": {k.url: 3}}).status_code == 401
    bad = c.post("/admin/weights", json={"weights": {k.url: -1}}, headers=adm)
    assert bad.status_code == 400 and "non-negative" in bad.json()["error"]["message"]
    assert (
        c.post("/admin/weights", json={"weights": {"http://x:1": 1}}, headers=adm).status_code
        == 404
    )
    ok = c.post("/admin/weights", json={"weights": {k.url: 3}}, headers=adm)
    assert ok.status_code == 200 and ok.json()["canary_rolled_back"] is None
    got = [c.post("/v1/completions", json={"prompt": "x"}).json()["backend"] for _ in range(8)]
    assert got.count("canary") == 6  # weights 3:1 in smooth round-robin


def test_admin_disabled_without_admin_key(procs):
    a = procs(Fake("a"))
    r = procs(RouterProc(*backends(a), *FAST))
    resp = httpx.post(r.url + "/admin/weights", json={"weights": {a.url: 0}})
    assert resp.status_code == 403


HOSTS = "/etc/hosts"
NAME = "ringserve-router-test-dns.invalid"


def _hosts(ips: list[str]) -> None:
    with open(HOSTS) as f:
        lines = [ln for ln in f.read().splitlines() if NAME not in ln]
    lines += [f"{ip} {NAME}" for ip in ips]
    with open(HOSTS, "w") as f:
        f.write("\n".join(lines) + "\n")


@pytest.mark.skipif(
    not __import__("os").access(HOSTS, __import__("os").W_OK), reason="needs a writable /etc/hosts"
)
def test_dns_add_and_remove(procs):
    port = __import__("tests.router.conftest", fromlist=["free_port"]).free_port()
    procs(Fake("a", "127.0.0.2", port)), procs(Fake("b", "127.0.0.3", port))
    try:
        _hosts(["127.0.0.2"])
        r = procs(RouterProc("--backends-dns", f"{NAME}:{port}", "--dns-interval", "0.3",
                             "--routing-logic", "round-robin", *FAST))  # fmt: skip
        c = httpx.Client(base_url=r.url, timeout=30)
        assert {
            c.post("/v1/completions", json={"prompt": "x"}).json()["backend"] for _ in range(3)
        } == {"a"}
        _hosts(["127.0.0.2", "127.0.0.3"])
        wait_for(lambda: r.metrics()["vllm:healthy_pods_total"] == 2, what="b added")
        got = {c.post("/v1/completions", json={"prompt": "x"}).json()["backend"] for _ in range(4)}
        assert got == {"a", "b"}
        _hosts(["127.0.0.3"])
        wait_for(lambda: r.metrics()["vllm:healthy_pods_total"] == 1, what="a removed")
        assert {
            c.post("/v1/completions", json={"prompt": "x"}).json()["backend"] for _ in range(3)
        } == {"b"}
    finally:
        _hosts([])


def test_least_loaded_reads_the_scraped_queue_and_session_sticks(procs):
    a, b = procs(Fake("a")), procs(Fake("b"))
    a.control(waiting=50)  # a's scraped vllm:num_requests_waiting
    r = procs(RouterProc(*backends(a, b), "--routing-logic", "least-loaded", *FAST))
    c = httpx.Client(base_url=r.url, timeout=30)
    wait_for(
        lambda: c.post("/v1/completions", json={"prompt": "x"}).json()["backend"] == "b",
        what="scrape",
    )
    assert {
        c.post("/v1/completions", json={"prompt": "x"}).json()["backend"] for _ in range(6)
    } == {"b"}
    a.control(waiting=0)
    b.control(waiting=50)
    wait_for(
        lambda: c.post("/v1/completions", json={"prompt": "x"}).json()["backend"] == "a",
        what="rescrape",
    )
    s = procs(
        RouterProc(*backends(a, b), "--routing-logic", "session", "--session-key", "user", *FAST)
    )
    c = httpx.Client(base_url=s.url, timeout=30)
    by_header = {c.post("/v1/completions", json={"prompt": "x"}, headers={"user": "alice"}).json()["backend"]
                 for _ in range(4)}  # fmt: skip
    by_body = {c.post("/v1/completions", json={"prompt": "x", "user": "alice"}).json()["backend"]
               for _ in range(4)}  # fmt: skip
    assert len(by_header) == 1 and by_body == by_header
    users = {c.post("/v1/completions", json={"prompt": "x", "user": f"u{i}"}).json()["backend"]
             for i in range(16)}  # fmt: skip
    assert users == {"a", "b"}


def test_router_killed_mid_stream_harms_no_backend(procs):
    a = procs(Fake("a"))
    a.control(delay=0.2)
    r = procs(RouterProc(*backends(a), *FAST))
    body = {"prompt": "x", "max_tokens": 50, "stream": True}
    with pytest.raises(httpx.TransportError):
        with httpx.stream("POST", r.url + "/v1/completions", json=body, timeout=30) as resp:
            for i, _ in enumerate(resp.iter_lines()):
                if i == 2:
                    r.proc.kill()
    assert httpx.get(a.url + "/health").status_code == 200
    a.control(delay=0.0)
    assert httpx.post(a.url + "/v1/completions", json={"prompt": "x"}).status_code == 200
