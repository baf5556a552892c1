"""The router in front of two real replicas (`python -m frontend`, the default model): the
prefix-aware logic keeps a conversation on its replica and spreads cold traffic, and a replica
SIGKILLed mid-stream leaves the client a stream equal to an uninterrupted greedy run."""

from __future__ import annotations

import json
import os
import re
import signal
import threading

import httpx
import pytest

from tests.frontend.conftest import ServerProcess
from tests.router.conftest import RouterProc, wait_for

pytestmark = pytest.mark.slow
REPLICA_FLAGS = ("--num-threads", "1", "--max-num-seqs", "4", "--kv-cache-space-gib", "0.25",
                 "--disable-log-requests")  # fmt: skip


@pytest.fixture(scope="module")
def replicas():
    """Two replicas, started once; a test that kills one replaces it (`replace(i)`)."""
    started: list[ServerProcess] = []
    live = [ServerProcess(*REPLICA_FLAGS) for _ in range(2)]
    started += live
    for s in live:
        s.wait_ready()

    class Replicas(list):
        def replace(self, i: int) -> None:
            s = ServerProcess(*REPLICA_FLAGS)
            started.append(s)
            self[i] = s.wait_ready()

    yield Replicas(live)
    pids: list[int] = []
    for s in started:
        pids += [s.proc.pid] + ([s.engine_pid] if s.engine_pid else [])
        s.stop()
        os.unlink(s.log_path)
    leftovers = ServerProcess.leftovers(pids)
    assert not leftovers, leftovers


def start_router(procs, replicas, *args: str) -> RouterProc:
    urls = ",".join(s.base_url for s in replicas)
    r = procs(RouterProc("--backends", urls, "--admin-key", "adm", "--health-interval", "0.2",
                         "--backoff-base", "0.1", *args))  # fmt: skip

    def probed() -> bool:
        st = httpx.get(r.url + "/admin/state", headers={"Authorization": "Bearer adm"}).json()
        return all(b["healthy"] and b["ringserve"] for b in st["backends"])

    wait_for(probed, 60, "replicas probed")
    return r


def served(r: RouterProc) -> dict[str, float]:
    pat = r'vllm:num_incoming_requests_total\{server="([^"]+)"\}'
    return {re.match(pat, k).group(1): v for k, v in r.metrics().items() if re.match(pat, k)}


def test_prefix_aware_keeps_conversations_and_spreads_cold_traffic(procs, replicas):
    r = start_router(procs, replicas, "--routing-logic", "prefix-aware")
    c = httpx.Client(base_url=r.url, timeout=120)
    # cold traffic at once: load counted at dispatch spreads it over both replicas
    out: list = []

    def cold(i: int) -> None:
        body = {"prompt": f"{i} is a number that", "max_tokens": 24, "ignore_eos": True}
        out.append(c.post("/v1/completions", json=body).status_code)

    threads = [threading.Thread(target=cold, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [200] * 4
    counts = served(r)
    assert sorted(counts.values()) == [2.0, 2.0], counts
    # a conversation, turn after turn, goes back to the replica that holds its prefix
    msgs = [{"role": "system", "content": "You are a terse assistant. " * 8},
            {"role": "user", "content": "Name a colour."}]  # fmt: skip
    homes = []
    for turn in range(3):
        before = served(r)
        resp = c.post(
            "/v1/chat/completions", json={"messages": msgs, "max_tokens": 8, "temperature": 0}
        )
        assert resp.status_code == 200, resp.text
        after = served(r)
        homes += [u for u in after if after[u] > before.get(u, 0)]
        msgs += [{"role": "assistant", "content": resp.json()["choices"][0]["message"]["content"]},
                 {"role": "user", "content": f"Another one, number {turn}."}]  # fmt: skip
    assert len(homes) == 3 and len(set(homes)) == 1, homes
    m = r.metrics()
    assert m[f'router_routing_decisions_total{{backend="{homes[0]}",reason="prefix-hit"}}'] == 2
    assert m["router_prefix_index_hit_ratio"] > 0


def _kill(server: ServerProcess) -> None:
    os.kill(server.proc.pid, signal.SIGKILL)
    if server.engine_pid:
        os.kill(server.engine_pid, signal.SIGKILL)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_sigkill_mid_stream_greedy_equals_uninterrupted(procs, replicas, chat):
    r = start_router(procs, replicas, "--routing-logic", "least-loaded")
    if chat:
        path = "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "Tell me a story about a cat."}]}
    else:
        path = "/v1/completions"  # echo: the prompt comes back once, not again on failover
        body = {"prompt": "Once upon a time, in a land far away,", "echo": True}
    body.update(max_tokens=60, temperature=0, ignore_eos=True)
    ref = httpx.post(replicas[0].base_url + path, json=body, timeout=120).json()["choices"][0]
    ref_text = ref["message"]["content"] if chat else ref["text"]
    assert chat or ref_text.startswith(body["prompt"])
    before = served(r)
    text, n, killed, usage = "", 0, None, None
    with httpx.stream("POST", r.url + path, json={**body, "stream": True,
                      "stream_options": {"include_usage": True}}, timeout=120) as resp:  # fmt: skip
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            assert "error" not in obj, obj
            assert "token_ids" not in json.dumps(obj)  # the router's extension stays inside
            usage = obj.get("usage") or usage
            for ch in obj["choices"]:
                text += ch.get("text") or (ch.get("delta") or {}).get("content") or ""
            n += 1
            if n == 8 and killed is None:
                after = served(r)
                url = next(u for u in after if after[u] > before.get(u, 0))
                killed = next(i for i, s in enumerate(replicas) if s.base_url == url)
                _kill(replicas[killed])
    assert killed is not None
    assert text == ref_text
    assert usage["completion_tokens"] == 60
    assert r.metrics()["router_failovers_total"] == 1
    replicas.replace(killed)


def _stream_choices(url: str, path: str, body: dict, on_event=None) -> tuple[dict, dict | None]:
    """Stream `body`; per choice index its text and logprob tokens (and completions' offsets),
    and the usage."""
    got: dict[int, dict] = {}
    usage, n = None, 0
    with httpx.stream("POST", url + path, json=body, timeout=180) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            assert "error" not in obj, obj
            assert "token_ids" not in json.dumps(obj)
            if obj.get("usage"):
                assert usage is None, "usage sent twice"
                usage = obj["usage"]
            for ch in obj["choices"]:
                g = got.setdefault(ch["index"], {"text": "", "tokens": [], "offsets": []})
                g["text"] += ch.get("text") or (ch.get("delta") or {}).get("content") or ""
                lp = ch.get("logprobs") or {}
                if "content" in lp:
                    g["tokens"] += [t["token"] for t in lp["content"] or []]
                else:
                    g["tokens"] += lp.get("tokens") or []
                    g["offsets"] += lp.get("text_offset") or []
                if ch.get("finish_reason"):
                    g["finish"] = ch["finish_reason"]
            n += 1
            if on_event is not None:
                on_event(n)
    return got, usage


@pytest.mark.parametrize("case", ["two-prompts-n2", "chat-n2"])
def test_sigkill_mid_stream_many_choices_equal_uninterrupted(procs, replicas, case):
    """n=2 and a list of prompts: every choice continues with its own tokens (and logprobs),
    and usage counts the whole request once."""
    r = start_router(procs, replicas, "--routing-logic", "least-loaded")
    if case == "chat-n2":
        path = "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "Tell me a story about a cat."}],
                "logprobs": True, "top_logprobs": 2}  # fmt: skip
    else:
        path = "/v1/completions"
        body = {"prompt": ["Once upon a time, in a land far away,", "The three laws of"],
                "logprobs": 2}  # fmt: skip
    body.update(n=2, max_tokens=40, temperature=0, ignore_eos=True)
    ref = httpx.post(replicas[0].base_url + path, json=body, timeout=180).json()
    before = served(r)
    killed: list[int] = []

    def kill_at(n: int) -> None:
        if n == 12 and not killed:
            after = served(r)
            url = next(u for u in after if after[u] > before.get(u, 0))
            killed.append(next(i for i, s in enumerate(replicas) if s.base_url == url))
            _kill(replicas[killed[0]])

    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    got, usage = _stream_choices(r.url, path, stream, kill_at)
    assert killed
    assert r.metrics()["router_failovers_total"] == 1
    assert sorted(got) == [c["index"] for c in ref["choices"]]
    for c in ref["choices"]:
        g = got[c["index"]]
        if case == "chat-n2":
            assert g["text"] == c["message"]["content"]
            assert g["tokens"] == [t["token"] for t in c["logprobs"]["content"]]
        else:
            assert g["text"] == c["text"]
            assert g["tokens"] == c["logprobs"]["tokens"]
            assert g["offsets"] == c["logprobs"]["text_offset"]
        assert g["finish"] == "length"
    assert usage == ref["usage"]
    replicas.replace(killed[0])


def test_frontend_token_id_extensions(replicas):
    """What exact failover stands on: streamed token_ids, and continuation_token_ids."""
    url = replicas[0].base_url
    body = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    whole = httpx.post(
        url + "/v1/completions", json={**body, "return_token_ids": True}, timeout=120
    )
    ids, text = whole.json()["choices"][0]["token_ids"], whole.json()["choices"][0]["text"]
    assert len(ids) == 12
    streamed = []
    with httpx.stream("POST", url + "/v1/completions", timeout=120,
                      json={**body, "stream": True, "return_token_ids": True}) as r:  # fmt: skip
        for line in r.iter_lines():
            if line.startswith("data: {"):
                streamed += json.loads(line[6:])["choices"][0]["token_ids"]
    assert streamed == ids
    cont = httpx.post(url + "/v1/completions", timeout=120,
                      json={**body, "max_tokens": 7, "continuation_token_ids": ids[:5]}).json()  # fmt: skip
    head = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 5}, timeout=120).json()
    assert head["choices"][0]["text"] + cont["choices"][0]["text"] == text
    chat = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    full = httpx.post(url + "/v1/chat/completions", json=chat, timeout=120).json()["choices"][0]
    rest = httpx.post(url + "/v1/chat/completions", timeout=120,
                      json={**chat, "max_tokens": 5, "continuation_token_ids": full["token_ids"][:3]}).json()  # fmt: skip
    assert rest["choices"][0]["token_ids"] == full["token_ids"][3:]
    bad = httpx.post(url + "/v1/completions", json={**body, "continuation_token_ids": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "continuation_token_ids"
    two = httpx.post(
        url + "/v1/completions", json={**body, "prompt": ["a", "b"], "continuation_token_ids": [1]}
    )
    assert two.status_code == 400


def test_replicas_behind_an_api_key(procs, monkeypatch):
    """Replicas started with --api-key: the router's own probes, scrapes and /v1/models carry
    --backend-api-key ($ROUTER_BACKEND_API_KEY here), and so do the requests it forwards (the
    client holds only the router's key); without it the client's header goes through."""
    keyed = [ServerProcess(*REPLICA_FLAGS, api_key="backend-secret") for _ in range(2)]
    try:
        for s in keyed:
            s.wait_ready()
        urls = ",".join(s.base_url for s in keyed)
        adm = {"Authorization": "Bearer adm"}
        monkeypatch.setenv("ROUTER_BACKEND_API_KEY", "backend-secret")
        r = procs(RouterProc("--backends", urls, "--api-key", "router-key", "--admin-key", "adm",
                             "--health-interval", "0.2"))  # fmt: skip
        monkeypatch.delenv("ROUTER_BACKEND_API_KEY")

        def state() -> list[dict]:
            return httpx.get(r.url + "/admin/state", headers=adm).json()["backends"]

        def probed_and_scraped() -> bool:
            return all(b["healthy"] and b["ringserve"] and b["scraped_s_ago"] is not None
                       and b["scraped_s_ago"] < 2 for b in state())  # fmt: skip

        wait_for(probed_and_scraped, 60, "keyed replicas probed and scraped")
        assert all("waiting" in b["load"] for b in state())
        client = {"Authorization": "Bearer router-key"}
        models = httpx.get(r.url + "/v1/models", headers=client).json()["data"]
        assert [m["owned_by"] for m in models] == ["ringserve"]
        body = {"prompt": "Hello", "max_tokens": 4}
        ok = httpx.post(r.url + "/v1/completions", json=body, headers=client, timeout=120)
        assert ok.status_code == 200, ok.text
        assert httpx.post(r.url + "/v1/completions", json=body, timeout=30).status_code == 401
        # No backend key: the client's Authorization header is what the backends see.
        plain = procs(RouterProc("--backends", urls, "--admin-key", "adm",
                                 "--health-interval", "0.2"))  # fmt: skip
        wait_for(lambda: plain.log().count("answers /metrics with 401") == 2, 30, "401 logged")
        st = httpx.get(plain.url + "/admin/state", headers=adm).json()["backends"]
        assert all(b["healthy"] and b["scraped_s_ago"] is None and not b["ringserve"] for b in st)
        theirs = {"Authorization": "Bearer backend-secret"}
        ok = httpx.post(plain.url + "/v1/completions", json=body, headers=theirs, timeout=120)
        assert ok.status_code == 200, ok.text
        denied = httpx.post(plain.url + "/v1/completions", json=body, timeout=30)
        assert denied.status_code == 401  # the backend's own answer, passed through
        assert len(httpx.get(plain.url + "/v1/models", headers=theirs).json()["data"]) == 1
    finally:
        pids: list[int] = []
        for s in keyed:
            pids += [s.proc.pid] + ([s.engine_pid] if s.engine_pid else [])
            s.stop()
            os.unlink(s.log_path)
        assert not ServerProcess.leftovers(pids)
