"""The router against 2 replicas: production-stack's multi-round QA workload, once per routing
logic in the same run (fresh prompts each, so no logic inherits another's cache).

Users share a system prompt and keep growing histories (their questions and the answers); a
round is one chat request, streamed, with a fixed answer length, issued at a global rate. Per
logic: the replicas' prefix cache hit rate (vllm:prefix_cache_hits_total / queries_total),
TTFT p50/p99, output tokens/s, errors. --two-routers adds prefix-aware behind two independent
routers (each request to either, as behind a Service: each router's index sees half the
history); --overhead, TTFT through a router over TTFT direct on one replica; and
--kill-one-halfway, a prefix-aware run in which one replica is SIGKILLed when half the
requests are sent (the target: 0 failed requests).

The default sizes (9 users, 4 rounds, 200 + 400 words of prompt, 24-token answers, 0.25 GiB
of KV a replica) put all users' conversations at about 1.3x one replica's KV cache: spread
over both replicas (round-robin, least-loaded), each replica must hold them all and evicts;
kept to one replica each (prefix-aware, session), each holds about half.

    python tools/bench_router.py --kill-one-halfway --two-routers --overhead --json router.json
    python tools/bench_router.py --quick --kill-one-halfway --two-routers --overhead  # a check
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
           "--disable-log-requests", "--log-level", "info"]  # fmt: skip
    return start(cmd, port)


def kv_tokens(proc: subprocess.Popen) -> int | None:
    """The replica's KV cache size in tokens, from its startup log."""
    with open(proc.log_path, errors="replace") as f:  # type: ignore[attr-defined]
        m = re.search(r"KV cache: \d+ blocks of \d+ tokens = (\d+) tokens", f.read())
    return int(m.group(1)) if m else None


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


def _count(url: str, text: str) -> int:
    """Tokens of `text`, from a replica's /tokenize (the router does not route it)."""
    try:
        r = httpx.post(url + "/tokenize", json={"prompt": text}, timeout=30)
        return int(r.json()["count"])
    except (httpx.HTTPError, ValueError, KeyError):
        return 0


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


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
    args, router_urls: list[str], tokenize_url: str, seed: int, on_half=None
) -> dict:
    rng = random.Random(seed)
    system = f"[run {seed}] " + words(rng, args.shared_system_prompt)
    users = []
    for k in range(args.num_users):
        hist = [{"role": "system", "content": system},
                {"role": "user", "content": f"I am user {k}. " + words(rng, args.user_history_prompt)},
                {"role": "assistant", "content": "Noted."}]  # fmt: skip
        users.append(
            {"id": f"user-{seed}-{k}", "msgs": hist, "left": args.num_rounds, "busy": False}
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
    # every user's whole conversation, the shared system prompt counted once
    last: dict[str, int] = {}
    for r in results:
        if r.get("prompt_tokens"):
            last[r["user"]] = max(last.get(r["user"], 0), r["prompt_tokens"] + r["tokens"])
    shared = _count(tokenize_url, system) if last else 0
    return {
        "requests": len(results),
        "errors": len(errors),
        "error_samples": errors[:3],
        "ttft_p50_s": pct(0.5),
        "ttft_p99_s": pct(0.99),
        "output_tok_s": sum(r.get("tokens", 0) for r in results) / wall,
        "wall_s": wall,
        "working_set_tokens": sum(last.values()) - max(0, len(last) - 1) * shared,
    }


async def _ttfts(url: str, n: int, seed: int) -> list[float]:
    """TTFTs of n sequential streamed one-token completions (short prompts, each new)."""
    out = []
    async with httpx.AsyncClient(timeout=120) as client:
        for i in range(n):
            body = {"prompt": f"[{seed}-{i}] The weather today is", "max_tokens": 1,
                    "temperature": 0, "stream": True}  # fmt: skip
            t0 = time.monotonic()
            first = None
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data: {"):
                        first = time.monotonic() - t0
            if first is None:
                raise RuntimeError(f"{url}: no event in the stream (HTTP {r.status_code})")
            out.append(first)
    return out


def measure_overhead(args, replica: str) -> dict:
    """TTFT of one replica asked directly vs through a router in front of it alone, the two
    interleaved in rounds so that the machine's noise hits both alike."""
    port = free_port()
    cmd = [sys.executable, "-m", "router", "--backends", replica, "--port", str(port),
           "--log-level", "warning"]  # fmt: skip
    proc, url = start(cmd, port)
    direct: list[float] = []
    routed: list[float] = []
    try:
        time.sleep(1.5)  # the first probes and scrapes
        asyncio.run(_ttfts(replica, 3, -1))  # warm up both paths
        asyncio.run(_ttfts(url, 3, -2))
        for k in range(args.overhead_rounds):
            direct += asyncio.run(_ttfts(replica, 5, 2 * k))
            routed += asyncio.run(_ttfts(url, 5, 2 * k + 1))
    finally:
        stop(proc)
    d, r = sorted(direct), sorted(routed)
    d50, r50 = d[len(d) // 2], r[len(r) // 2]
    return {"logic": "overhead (1 replica)", "direct_ttft_p50_s": d50,
            "router_ttft_p50_s": r50, "ttft_ratio": r50 / d50, "added_ms": 1e3 * (r50 - d50),
            "requests": len(d) + len(r)}  # fmt: skip


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
        out = asyncio.run(workload(args, urls, replicas[0], seed, kill))
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


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_summary(results: list[dict], kv: int | None) -> None:
    runs = [r for r in results if "prefix_cache_hit_rate" in r]
    print(f"{'logic':32} {'hit rate':>8} {'ttft p50':>9} {'ttft p99':>9} {'tok/s':>7} "
          f"{'errors':>6} {'failovers':>9}")  # fmt: skip
    for r in runs:
        print(f"{r['logic']:32} {r['prefix_cache_hit_rate']:8.3f} {_f(r['ttft_p50_s']):>9} "
              f"{_f(r['ttft_p99_s']):>9} {r['output_tok_s']:7.1f} {r['errors']:6d} "
              f"{r['failovers']:9.0f}")  # fmt: skip
    by = {r["logic"]: r for r in runs}
    if kv and runs:
        ws = max(r["working_set_tokens"] for r in runs)
        print(f"all users' conversations: {ws} tokens, {ws / kv:.2f}x one replica's KV cache "
              f"({kv} tokens): round-robin and least-loaded spread every user over both "
              f"replicas (evicting when above 1x), prefix-aware and session keep about half "
              f"on each")  # fmt: skip
    rr, pa = by.get("round-robin"), by.get("prefix-aware")
    if rr and pa:
        ratio = pa["prefix_cache_hit_rate"] / max(rr["prefix_cache_hit_rate"], 1e-9)
        print(f"prefix-aware / round-robin: hit rate {ratio:.2f}x, TTFT p50 "
              f"{_f(pa['ttft_p50_s'])} s vs {_f(rr['ttft_p50_s'])} s")  # fmt: skip
    two = by.get("prefix-aware x2 routers")
    if two and pa:
        ratio = two["prefix_cache_hit_rate"] / max(pa["prefix_cache_hit_rate"], 1e-9)
        print(f"two independent routers: hit rate {ratio:.2f}x one router's")
    kill = by.get("prefix-aware+kill-one-halfway")
    if kill:
        print(f"one replica SIGKILLed halfway: {kill['errors']} failed of {kill['requests']} "
              f"requests, {kill['failovers']:.0f} streams failed over")  # fmt: skip
    for r in results:
        if "ttft_ratio" in r:
            print(f"router TTFT overhead: p50 {_f(r['router_ttft_p50_s'])} s through the router "
                  f"vs {_f(r['direct_ttft_p50_s'])} s direct: {r['ttft_ratio']:.2f}x "
                  f"(+{r['added_ms']:.1f} ms, {r['requests']} requests)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-users", type=int, default=9)
    p.add_argument("--num-rounds", type=int, default=4)
    p.add_argument("--shared-system-prompt", type=int, default=200, help="words")
    p.add_argument("--user-history-prompt", type=int, default=400, help="words")
    p.add_argument("--answer-len", type=int, default=24, help="tokens")
    p.add_argument("--qps", type=float, default=1.0)
    p.add_argument("--routing-logics", default=",".join(LOGICS))
    p.add_argument("--kill-one-halfway", action="store_true")
    p.add_argument("--two-routers", action="store_true", help="also prefix-aware behind 2 routers")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--kv-gib", type=float, default=0.25, help="KV cache per replica")
    p.add_argument("--overhead", action="store_true",
                   help="also: TTFT through the router / direct, one replica")  # fmt: skip
    p.add_argument("--overhead-rounds", type=int, default=6, help="5 requests each way a round")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a check that it runs")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    if args.quick:
        args.num_users, args.num_rounds, args.answer_len, args.qps = 2, 2, 4, 4.0
        args.shared_system_prompt = args.user_history_prompt = 40
        args.overhead_rounds = 2
    t_start = time.monotonic()
    procs = [start_replica(args) for _ in range(2)]
    replicas = [u for _, u in procs]
    kv = kv_tokens(procs[0][0])
    print(f"KV cache per replica: {kv} tokens", flush=True)
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
        if args.overhead:
            res = measure_overhead(args, replicas[0])
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
    config = {k: v for k, v in vars(args).items() if k not in ("json", "plot")}
    summary = {"config": {**config, "kv_cache_tokens_per_replica": kv}, "results": results}
    print_summary(results, kv)
    print(f"total wall time: {time.monotonic() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)
    if args.plot:
        try:
            import matplotlib  # type: ignore[import-not-found]

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt  # type: ignore[import-not-found]
        except ImportError:
            print("--plot: matplotlib is not installed; no plot", file=sys.stderr)
        else:
            fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
            runs = [r for r in results if "prefix_cache_hit_rate" in r]
            names = [r["logic"] for r in runs]
            for ax, key, title in zip(axes, ["prefix_cache_hit_rate", "ttft_p50_s", "output_tok_s"],
                                      ["prefix cache hit rate", "TTFT p50 (s)", "output tok/s"], strict=True):  # fmt: skip
                ax.bar(range(len(names)), [r[key] or 0 for r in runs])
                ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
                ax.set_title(title)
            fig.tight_layout()
            fig.savefig(args.plot)


if __name__ == "__main__":
    main()
