"""The server under limits and at its end: a full queue answers 503, a large body 413, the
EngineCore killed under it, and SIGTERM draining.

The drain test stops the module's server, so it comes last in this file.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
BODY_LIMIT = 2048
DRAIN_S = 8.0
LONG = {"prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(
        *("--max-num-seqs", "1", "--max-queue-len", "1"),
        *("--max-request-body-bytes", str(BODY_LIMIT), "--drain-timeout", str(DRAIN_S)),
    )


def next_event(lines) -> dict | str:
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            return data if data == "[DONE]" else json.loads(data)
    raise AssertionError("the stream ended without [DONE]")


def rest_of_stream(lines) -> list:
    events = []
    while not events or events[-1] != "[DONE]":
        events.append(next_event(lines))
    return events


def test_full_queue_gets_503_with_retry_after(server):
    with server.client() as a, server.client() as b, server.client() as c:
        with a.stream("POST", "/v1/completions", json=LONG) as ra:
            assert ra.status_code == 200
            with b.stream("POST", "/v1/completions", json=LONG) as rb:
                assert rb.status_code == 200
                deadline = time.monotonic() + 10
                while server.metrics()["vllm:num_requests_waiting"] < 1:
                    assert time.monotonic() < deadline, "the second request never waited"
                    time.sleep(0.05)
                r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
                assert r.status_code == 503, r.text
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == 503
                assert "more than 1 requests would wait" in r.json()["error"]["message"]
                assert c.get("/health").status_code == 200  # everything else still works
                assert c.post("/tokenize", json={"prompt": "hi"}).status_code == 200
        # Both streams closed, so aborted: the queue empties and requests are served again.
        deadline = time.monotonic() + 10
        while True:
            r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.status_code == 200, r.text


def test_body_over_limit_gets_413_with_or_without_content_length(server):
    with server.client() as c:
        r = c.post("/v1/completions", json={"prompt": "x" * (BODY_LIMIT + 10)})
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == 413 and str(BODY_LIMIT) in err["message"]

    def chunks():  # chunked transfer: the size is known only while reading
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 512
        yield b'"}'

    with server.client() as c:
        r = c.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413, r.text
    with server.client() as c:
        ok = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert ok.status_code == 200


def test_engine_killed_fails_requests_and_server_exits_nonzero(start_server):
    server = start_server()
    pids = [server.proc.pid, server.engine_pid]
    with server.client() as c:
        with c.stream("POST", "/v1/completions", json=LONG) as r:
            lines = r.iter_lines()
            assert "choices" in next_event(lines)
            t0 = time.monotonic()
            os.kill(server.engine_pid, signal.SIGKILL)
            events = rest_of_stream(lines)
            assert time.monotonic() - t0 < 3.0
        err = events[-2]["error"]
        assert err["code"] == 500 and "SIGKILL" in err["message"]
        health = c.get("/health")
        assert health.status_code == 503 and "SIGKILL" in health.json()["error"]["message"]
        new = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert new.status_code == 503 and new.json()["error"]["code"] == 503
    assert server.proc.wait(10) != 0
    assert "exiting with status 1: the engine core process was killed by SIGKILL" in server.log()
    assert server.leftovers(pids) == []


def test_sigterm_drains_then_aborts_past_the_grace_period(server):
    pids = [server.proc.pid, server.engine_pid]
    short = {**LONG, "max_tokens": 6}
    with server.client() as c1, server.client() as c2:
        with c1.stream("POST", "/v1/completions", json=short) as r1:
            lines1 = r1.iter_lines()
            assert "choices" in next_event(lines1)
            with c2.stream("POST", "/v1/completions", json=LONG) as r2:
                lines2 = r2.iter_lines()
                t0 = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                time.sleep(0.5)
                with pytest.raises(httpx.ConnectError):  # no longer accepting
                    httpx.get(f"{server.base_url}/health", timeout=2.0)
                finished = rest_of_stream(lines1)
                assert finished[-2]["choices"][0]["finish_reason"] == "length"
                aborted = rest_of_stream(lines2)
                assert aborted[-2]["choices"][0]["finish_reason"] == "abort"
                cut = time.monotonic() - t0
                assert DRAIN_S - 0.5 < cut < DRAIN_S + 4.0  # at the grace period, not before
    assert server.proc.wait(15) == 0
    assert "SIGTERM: draining" in server.log()
    assert server.leftovers(pids) == []
