"""production-stack's multi-round QA workload (benchmarks/multi-round-qa) for tools/bench_router.py:
the users, their schedule, one streamed round, and what the replicas' /metrics and the routers'
/metrics say about a run.

Schedule, as production-stack's: `num_users` users, user k starting at k / qps, each sending a
round every num_users / qps seconds, or as soon as its previous answer is in when that is later
(a user never has two rounds in flight). While the replicas keep up, requests arrive at qps, in
the same user order every round. Each user's first message is the shared system prompt, then
its own history (`user_history_prompt` words), then a question; each round appends the answer
(`answer_len` tokens, ignore_eos) and a new question.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Callable

import httpx

_WORDS = ("alpha bravo cedar delta ember falcon grove harbor island jasper kettle lumen meadow "
          "nectar orbit prairie quartz river summit timber umber valley willow xenon yonder zephyr").split()  # fmt: skip


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def cache_counters(urls: list[str]) -> dict[str, tuple[float, float]]:
    """Per replica that answers: (prefix cache hits, queries), in tokens."""
    out = {}
    for u in urls:
        try:
            text = httpx.get(u + "/metrics", timeout=5).text
        except httpx.HTTPError:
            continue  # a killed replica
        hits = queries = 0.0
        pat = r"^(vllm:prefix_cache_(?:hits|queries)_total)\{[^}]*\} (\S+)"
        for name, value in re.findall(pat, text, re.M):
            if name.endswith("hits_total"):
                hits += float(value)
            else:
                queries += float(value)
        out[u] = (hits, queries)
    return out


def hit_rate(before: dict, after: dict) -> float:
    """Over the replicas read both times (a killed one's counters die with it)."""
    hits = sum(after[u][0] - before[u][0] for u in after if u in before)
    queries = sum(after[u][1] - before[u][1] for u in after if u in before)
    return hits / queries if queries > 0 else 0.0


def router_counters(urls: list[str]) -> dict:
    """Summed over the routers: failovers and routing decisions by reason."""
    failovers, reasons = 0.0, {}
    for u in urls:
        m = httpx.get(u + "/metrics", timeout=5).text
        failovers += sum(float(v) for v in re.findall(r"^router_failovers_total (\S+)", m, re.M))
        pat = r'^router_routing_decisions_total\{[^}]*reason="([^"]+)"[^}]*\} (\S+)'
        for reason, v in re.findall(pat, m, re.M):
            reasons[reason] = reasons.get(reason, 0) + int(float(v))
    return {"failovers": failovers, "decisions": reasons}


def count_tokens(url: str, text: str) -> int:
    """Tokens of `text`, from a replica's /tokenize (the router does not route it)."""
    try:
        r = httpx.post(url + "/tokenize", json={"prompt": text}, timeout=30)
        return int(r.json()["count"])
    except (httpx.HTTPError, ValueError, KeyError):
        return 0


async def one_round(client, url, msgs, answer_len, user_id) -> dict:
    body = {"messages": msgs, "max_tokens": answer_len, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "user": user_id}  # fmt: skip
    t0 = time.monotonic()
    ttft, text, tokens, prompt_tokens = None, "", 0, 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body,
                                 headers={"x-session-id": user_id}) as r:  # fmt: skip
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    return {"ok": False, "error": str(obj["error"])[:200]}
                for c in obj.get("choices", []):
                    piece = (c.get("delta") or {}).get("content") or ""
                    if piece and ttft is None:
                        ttft = time.monotonic() - t0
                    text += piece
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
                    prompt_tokens = obj["usage"]["prompt_tokens"]
    except httpx.HTTPError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return {"ok": tokens == answer_len, "ttft": ttft, "tokens": tokens, "text": text,
            "prompt_tokens": prompt_tokens, "user": user_id,
            "error": None if tokens == answer_len else f"{tokens} tokens"}  # fmt: skip


async def workload(
    args, router_urls: list[str], tokenize_url: str, seed: int, on_half: Callable | None = None
) -> dict:
    """One run: every user's rounds on production-stack's schedule; `on_half` is called when
    half the requests are sent. Fresh prompts per seed, so no run inherits another's cache."""
    rng = random.Random(seed)
    system = f"[run {seed}] " + words(rng, args.shared_system_prompt)
    total = args.num_users * args.num_rounds
    gap = args.num_users / args.qps  # between one user's rounds
    results: list[dict] = []
    late = 0  # rounds sent after their slot: the previous answer came later than the gap
    sent = 0
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.monotonic()

        async def user(k: int) -> None:
            nonlocal sent, late
            uid = f"user-{seed}-{k}"
            own = random.Random(f"{seed}-{k}")
            msgs = [{"role": "system", "content": system},
                    {"role": "user", "content": f"I am user {k}. " + words(own, args.user_history_prompt)},
                    {"role": "assistant", "content": "Noted."}]  # fmt: skip
            for r in range(args.num_rounds):
                slot = t0 + k / args.qps + r * gap
                wait = slot - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                elif r > 0:
                    late += 1
                msgs.append({"role": "user", "content": "Question: " + words(own, 8) + "?"})
                sent += 1
                if on_half is not None and sent == total // 2:
                    on_half()
                url = own.choice(router_urls)  # two routers behind a Service: either, per request
                res = await one_round(client, url, msgs, args.answer_len, uid)
                msgs.append({"role": "assistant", "content": res.get("text", "")})
                results.append(res)

        await asyncio.gather(*(user(k) for k in range(args.num_users)))
        wall = time.monotonic() - t0
    ttfts = sorted(r["ttft"] for r in results if r.get("ttft") is not None)

    def pct(p: float) -> float | None:
        return ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] if ttfts else None

    errors = [r["error"] for r in results if not r["ok"]]
    # every user's whole conversation, the shared system prompt counted once
    last: dict[str, int] = {}
    for r in results:
        if r.get("prompt_tokens"):
            last[r["user"]] = max(last.get(r["user"], 0), r["prompt_tokens"] + r["tokens"])
    shared = count_tokens(tokenize_url, system) if last else 0
    return {
        "requests": len(results),
        "errors": len(errors),
        "error_samples": errors[:3],
        "ttft_p50_s": pct(0.5),
        "ttft_p99_s": pct(0.99),
        "output_tok_s": sum(r.get("tokens", 0) for r in results) / wall,
        "wall_s": wall,
        "late_rounds": late,
        "shared_prompt_tokens": shared,
        "working_set_tokens": sum(last.values()) - max(0, len(last) - 1) * shared,
    }
