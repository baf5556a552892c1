"""The router against 2 replicas: production-stack's multi-round QA workload, once per routing
logic in the same run (fresh prompts each, so no logic inherits another's cache).

Users share a system prompt and keep growing histories (their questions and the answers); a
round is one chat request, streamed, with a fixed answer length, issued at a global rate. Per
logic: the replicas' prefix cache hit rate (vllm:prefix_cache_hits_total / queries_total),
TTFT p50/p99, output tokens/s, errors. --kill-one-halfway adds a prefix-aware run in which one
replica is SIGKILLed when half the requests are sent (the target: 0 failed requests).

    python tools/bench_router.py --json router.json --plot router.png --kill-one-halfway
    python tools/bench_router.py --quick            # a tiny check, about a minute
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGICS = ["round-robin", "least-loaded", "session", "prefix-aware"]
_WORDS = ("alpha bravo cedar delta ember falcon grove harbor island jasper kettle lumen meadow "
          "nectar orbit prairie quartz river summit timber umber valley willow xenon yonder zephyr").split()  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int) -> tuple[subprocess.Popen, str]:
    log = tempfile.NamedTemporaryFile(prefix="bench-router-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited; log in {log.name}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                proc.log_path = log.name  # type: ignore[attr-defined]
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{cmd} not ready; log in {log.name}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)  # the server and its engine core
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = getattr(proc, "log_path", None)
    if log and os.path.exists(log):
        os.unlink(log)  # kept only when a process failed to start (the error names it)


def start_replica(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "frontend", "--port", str(port), "--num-threads", "1",
           "--max-num-seqs", str(args.max_num_seqs), "--kv-cache-space-gib", str(args.kv_gib),
           "--disable-log-requests", "--log-level", "warning"]  # fmt: skip
    return start(cmd, port)


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


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


async def one_round(client, url, msgs, answer_len, user_id) -> dict:
    body = {"messages": msgs, "max_tokens": answer_len, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "user": user_id}  # fmt: skip
    t0 = time.monotonic()
    ttft, text, tokens = None, "", 0
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
    except httpx.HTTPError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return {"ok": tokens == answer_len, "ttft": ttft, "tokens": tokens, "text": text,
            "error": None if tokens == answer_len else f"{tokens} tokens"}  # fmt: skip


async def workload(args, router_urls: list[str], seed: int, on_half=None) -> dict:
    rng = random.Random(seed)
    system = f"[run {seed}] " + words(rng, args.shared_system_prompt)
    users = []
    for u in range(args.num_users):
        hist = [{"role": "system", "content": system},
                {"role": "user", "content": f"I am user {u}. " + words(rng, args.user_history_prompt)},
                {"role": "assistant", "content": "Noted."}]  # fmt: skip
        users.append(
            {"id": f"user-{seed}-{u}", "msgs": hist, "left": args.num_rounds, "busy": False}
        )
    total = args.num_users * args.num_rounds
    results, tasks, sent = [], [], 0
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def run_user(u: dict) -> None:
            u["msgs"].append({"role": "user", "content": "Question: " + words(rng, 8) + "?"})
            url = rng.choice(router_urls)  # two routers behind a Service: either, per request
            res = await one_round(client, url, u["msgs"], args.answer_len, u["id"])
            u["msgs"].append({"role": "assistant", "content": res.get("text", "")})
            results.append(res)
            u["busy"] = False

        t0 = time.monotonic()
        i = 0
        while sent < total:
            idle = [u for u in users if not u["busy"] and u["left"] > 0]
            if not idle:
                await asyncio.sleep(0.01)
                continue
            u = idle[i % len(idle)]
            i += 1
            u["busy"], u["left"] = True, u["left"] - 1
            tasks.append(asyncio.create_task(run_user(u)))
            sent += 1
            if on_half is not None and sent == total // 2:
                on_half()
            await asyncio.sleep(1.0 / args.qps)
        await asyncio.gather(*tasks)
        wall = time.monotonic() - t0
    ttfts = sorted(r["ttft"] for r in results if r.get("ttft") is not None)

    def pct(p: float) -> float | None:
        return ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] if ttfts else None

    errors = [r["error"] for r in results if not r["ok"]]
    return {
        "requests": len(results),
        "errors": len(errors),
        "error_samples": errors[:3],
        "ttft_p50_s": pct(0.5),
        "ttft_p99_s": pct(0.99),
        "output_tok_s": sum(r.get("tokens", 0) for r in results) / wall,
        "wall_s": wall,
    }


def run_logic(
    args, replicas: list[str], logic: str, seed: int, kill=None, num_routers: int = 1
) -> dict:
    routers = []
    for _ in range(num_routers):
        port = free_port()
        cmd = [sys.executable, "-m", "router", "--backends", ",".join(replicas), "--port", str(port),
               "--routing-logic", logic, "--log-level", "warning", "--max-queue", "100000"]  # fmt: skip
        routers.append(start(cmd, port))
    urls = [u for _, u in routers]
    try:
        time.sleep(1.5)  # the first probes and scrapes
        before = cache_counters(replicas)
        out = asyncio.run(workload(args, urls, seed, kill))
        out["prefix_cache_hit_rate"] = hit_rate(before, cache_counters(replicas))
        out["failovers"] = 0.0
        for u in urls:
            m = httpx.get(u + "/metrics", timeout=5).text
            out["failovers"] += sum(
                float(v) for v in re.findall(r"^router_failovers_total (\S+)", m, re.M)
            )
    finally:
        for proc, _ in routers:
            stop(proc)
    out["logic"] = logic
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-users", type=int, default=10)
    p.add_argument("--num-rounds", type=int, default=5)
    p.add_argument("--shared-system-prompt", type=int, default=400, help="words")
    p.add_argument("--user-history-prompt", type=int, default=400, help="words")
    p.add_argument("--answer-len", type=int, default=20, help="tokens")
    p.add_argument("--qps", type=float, default=1.0)
    p.add_argument("--routing-logics", default=",".join(LOGICS))
    p.add_argument("--kill-one-halfway", action="store_true")
    p.add_argument("--two-routers", action="store_true", help="also prefix-aware behind 2 routers")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--kv-gib", type=float, default=0.25, help="KV cache per replica")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a check that it runs")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    if args.quick:
        args.num_users, args.num_rounds, args.answer_len, args.qps = 2, 2, 4, 4.0
        args.shared_system_prompt = args.user_history_prompt = 40
    procs = [start_replica(args) for _ in range(2)]
    replicas = [u for _, u in procs]
    results = []
    try:
        for i, logic in enumerate(args.routing_logics.split(",")):
            res = run_logic(args, replicas, logic, seed=i + 1)
            results.append(res)
            print(json.dumps(res), flush=True)
        if args.two_routers:
            res = run_logic(args, replicas, "prefix-aware", seed=50, num_routers=2)
            res["logic"] = "prefix-aware x2 routers"
            results.append(res)
            print(json.dumps(res), flush=True)
        if args.kill_one_halfway:
            res = run_logic(args, replicas, "prefix-aware", seed=99,
                            kill=lambda: stop(procs[1][0], signal.SIGKILL))  # fmt: skip
            res["logic"] = "prefix-aware+kill-one-halfway"
            results.append(res)
            print(json.dumps(res), flush=True)
    finally:
        for proc, _ in procs:
            stop(proc)
    summary = {"config": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
               "results": results}  # fmt: skip
    print(
        f"{'logic':32} {'hit rate':>8} {'ttft p50':>9} {'ttft p99':>9} {'tok/s':>7} {'errors':>6}"
    )
    for r in results:

        def f(x):
            return "-" if x is None else f"{x:.3f}"

        print(f"{r['logic']:32} {r['prefix_cache_hit_rate']:8.3f} {f(r['ttft_p50_s']):>9} "
              f"{f(r['ttft_p99_s']):>9} {r['output_tok_s']:7.1f} {r['errors']:6d}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("--plot: matplotlib is not installed; no plot", file=sys.stderr)
        else:
            fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
            names = [r["logic"] for r in results]
            for ax, key, title in zip(axes, ["prefix_cache_hit_rate", "ttft_p50_s", "output_tok_s"],
                                      ["prefix cache hit rate", "TTFT p50 (s)", "output tok/s"], strict=True):  # fmt: skip
                ax.bar(range(len(names)), [r[key] or 0 for r in results])
                ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
                ax.set_title(title)
            fig.tight_layout()
            fig.savefig(args.plot)


if __name__ == "__main__":
    main()
