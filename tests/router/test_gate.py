"""prefix-aware's decisions under load: the load it gates on (no double counting, stale scrapes
ignored), conversations kept at home while every backend is equally busy, new conversations
that share only a system prompt spread by the index's per-backend size, and the index's sizes
kept exact through eviction and forgetting."""

from __future__ import annotations

import random
import time

import pytest

from router.backends import Backend
from router.config import RouterConfig, parse_args
from router.prefix_index import PrefixIndex
from router.proxy import prefix_text
from router.routing import PrefixAware, RouteInfo, make_policy

SYSTEM = "You are a careful assistant who answers questions about the weather. " * 4


def _pair() -> list[Backend]:
    return [Backend("http://127.0.0.1:9001"), Backend("http://127.0.0.1:9002")]


def _policy(**kw) -> PrefixAware:
    return PrefixAware(PrefixIndex(block_chars=16, max_blocks=100_000), 8, 1.5,
                       rng=random.Random(0), **kw)  # fmt: skip


def _conv(user: int, turns: int) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"I am user {user}. " + f"my note {user} " * 40}]  # fmt: skip
    for t in range(turns):
        msgs += [{"role": "assistant", "content": f"answer {t} to {user} " * 3},
                 {"role": "user", "content": f"question {t} from {user}?"}]  # fmt: skip
    return msgs


def _send(p: PrefixAware, bs: list[Backend], msgs: list[dict]) -> tuple[Backend, str]:
    info = RouteInfo(prefix_text({"messages": msgs}))
    b, reason = p.choose(bs, info)
    p.record(b, info)
    return b, reason


def _scraped(b: Backend, running: float, waiting: float, age: float = 0.0) -> None:
    b.load = {"running": running, "waiting": waiting, "kv_usage": 0.9}
    b.scraped_at = time.monotonic() - age


def test_requests_count_a_waiting_request_once_and_ignore_stale_scrapes():
    b = Backend("http://127.0.0.1:9001")
    b.in_flight = 6
    _scraped(b, running=4, waiting=2)  # the same 6 requests, seen by the replica
    assert b.requests(time.monotonic(), 2.0) == 6
    _scraped(b, running=8, waiting=3)  # another router's requests too
    assert b.requests(time.monotonic(), 2.0) == 11
    _scraped(b, running=8, waiting=3, age=5.0)  # stale: only what this router counts
    assert b.requests(time.monotonic(), 2.0) == 6
    b.weight = 2.0
    assert b.requests(time.monotonic(), 2.0) == 3
    assert b.score(time.monotonic(), 2.0) == 3  # stale: no KV term either
    _scraped(b, running=0, waiting=0)
    assert b.score(time.monotonic(), 2.0) == pytest.approx(3 + 0.45)


def test_new_conversations_sharing_a_system_prompt_spread_then_stay_home():
    bs, p = _pair(), _policy()
    homes, reasons = {}, set()
    for u in range(10):  # one at a time: load alone would send every one to either backend
        homes[u], reason = _send(p, bs, _conv(u, 0))
        reasons.add(reason)
    # each matches only the system prompt on the backend that saw it first: below the
    # threshold, so by the index's size, alternately
    assert reasons <= {"cold", "low-match"} and "low-match" in reasons
    assert sum(h is bs[0] for h in homes.values()) == 5
    for turn in range(1, 4):
        for u in range(10):
            b, reason = _send(p, bs, _conv(u, turn))
            assert (b, reason) == (homes[u], "prefix-hit")


def test_equal_overload_keeps_every_conversation_home():
    bs, p = _pair(), _policy()
    homes = {u: _send(p, bs, _conv(u, 0))[0] for u in range(9)}
    # both replicas saturated about equally: 5 and 4 of ours in flight, and the replicas'
    # own gauges counting the same requests (running 3-4, waiting 1-2)
    bs[0].in_flight, bs[1].in_flight = 5, 4
    _scraped(bs[0], running=3, waiting=2)
    _scraped(bs[1], running=3, waiting=1)
    for u in range(9):
        b, reason = _send(p, bs, _conv(u, 1))
        assert (b, reason) == (homes[u], "prefix-hit")
    # a home 7 requests behind its peer, its waiting gauge counting 3 of them: still within
    # the absolute gap (the old score, in-flight + waiting, saw 10 and routed away)
    bs[0].in_flight, bs[1].in_flight = 7, 0
    _scraped(bs[0], running=4, waiting=3)
    _scraped(bs[1], running=0, waiting=0)
    for u in (u for u in homes if homes[u] is bs[0]):
        assert _send(p, bs, _conv(u, 2)) == (bs[0], "prefix-hit")


def test_overloaded_home_and_imbalanced_pool_go_to_the_least_loaded():
    bs, p = _pair(), _policy()
    home = _send(p, bs, _conv(0, 0))[0]
    other = bs[1] if home is bs[0] else bs[0]
    home.in_flight = 9  # 9 - 0 > 8 and 9 > 1.5 * 0
    assert _send(p, bs, _conv(0, 1)) == (other, "overloaded")
    # a new conversation while imbalanced: the least-loaded, whatever the index sizes say
    for u in range(1, 4):
        assert _send(p, bs, _conv(u, 0)) == (other, "imbalanced")
    # conversation 0 now lives on `other` (its longest prefix); both gaps are needed to move
    # it: 12 against 5 is 7 requests apart, within the absolute gap
    other.in_flight, home.in_flight = 12, 5
    assert _send(p, bs, _conv(0, 2)) == (other, "prefix-hit")
    # 30 against 21: 9 apart but 1.43x, within the relative gap
    other.in_flight, home.in_flight = 30, 21
    assert _send(p, bs, _conv(0, 3)) == (other, "prefix-hit")


def test_cache_threshold_decides_between_the_match_and_the_spare_cache():
    bs = _pair()
    p = _policy(cache_threshold=0.0)  # any match wins: the system prompt's holder takes all
    first = _send(p, bs, _conv(0, 0))[0]
    assert all(_send(p, bs, _conv(u, 0)) == (first, "prefix-hit") for u in range(1, 6))
    p = _policy(cache_threshold=1.0)  # nothing is ever enough: always the smaller index
    picks = [_send(p, bs, _conv(0, t))[0] for t in range(6)]
    assert picks.count(bs[0]) == 3


def test_index_sizes_stay_exact_through_eviction_and_forget():
    idx = PrefixIndex(block_chars=4, max_blocks=50)
    rng = random.Random(3)
    urls = ["a", "b", "c"]
    for _ in range(400):
        text = "".join(rng.choice("xyz") for _ in range(rng.randrange(4, 60)))
        idx.record(idx.keys(text), rng.choice(urls))
        assert len(idx) <= 50
        held = {u: sum(u in h for h in idx._lru.values()) for u in urls}
        assert held == {u: idx.size(u) for u in urls}
    idx.forget("b")
    assert idx.size("b") == 0
    assert {u: sum(u in h for h in idx._lru.values()) for u in urls} == {
        u: idx.size(u) for u in urls
    }


def test_cache_threshold_config():
    cfg, _ = parse_args(["--backends", "http://h:1", "--cache-threshold", "0.3"])
    assert cfg.cache_threshold == 0.3
    assert make_policy("prefix-aware", cfg).cache_threshold == 0.3  # type: ignore[attr-defined]
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="cache_threshold"):
            RouterConfig(backends_dns="h:1", cache_threshold=bad)
    with pytest.raises(ValueError, match="balance_rel_threshold"):
        RouterConfig(backends_dns="h:1", balance_rel_threshold=0.5)
