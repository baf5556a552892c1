"""The router against 2 replicas: production-stack's multi-round QA workload
(tools/router_workload.py), once per routing logic in the same run (fresh prompts each, so no
logic inherits another's cache).

Users share a system prompt and keep growing histories (their questions and the answers); a
round is one chat request, streamed, with a fixed answer length; user k starts at k / qps and
sends a round every num_users / qps seconds (or when its previous answer is in, if later). Per
logic: the replicas' prefix cache hit rate (vllm:prefix_cache_hits_total / queries_total),
TTFT p50/p99, output tokens/s, errors, the routers' decisions by reason. --two-routers adds
prefix-aware behind two independent routers (each request to either, as behind a Service: each
router's index sees half the history); --overhead, TTFT through a router over TTFT direct on
one replica; and --kill-one-halfway, a prefix-aware run in which one replica is SIGKILLed when
half the requests are sent (the target: 0 failed requests).

The default sizes (README, Router) make one replica's KV cache hold about 60% of the users'
conversations: kept to one replica each (prefix-aware, session), each replica holds its half;
sent to either (round-robin: with an odd number of users, a user's rounds alternate between
the replicas), each replica must hold every user and LRU evicts a history before its user
comes back.

    python tools/bench_router.py --kill-one-halfway --two-routers --overhead --json router.json
    python tools/bench_router.py --quick --kill-one-halfway --two-routers --overhead  # a check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tools.router_workload import cache_counters, hit_rate, router_counters, workload  # noqa: E402

LOGICS = ["round-robin", "least-loaded", "session", "prefix-aware"]


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
        out.update(router_counters(urls))
    finally:
        for proc, _ in routers:
            stop(proc)
    out["logic"] = logic
    out["load_avg_1min"] = os.getloadavg()[0]
    return out


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_summary(results: list[dict], kv: int | None, config: dict) -> None:
    runs = [r for r in results if "prefix_cache_hit_rate" in r]
    print(f"{'logic':32} {'hit rate':>8} {'ttft p50':>9} {'ttft p99':>9} {'tok/s':>7} "
          f"{'errors':>6} {'failovers':>9} {'late':>4}  decisions")  # fmt: skip
    for r in runs:
        print(f"{r['logic']:32} {r['prefix_cache_hit_rate']:8.3f} {_f(r['ttft_p50_s']):>9} "
              f"{_f(r['ttft_p99_s']):>9} {r['output_tok_s']:7.1f} {r['errors']:6d} "
              f"{r['failovers']:9.0f} {r['late_rounds']:4d}  {r['decisions']}")  # fmt: skip
    by = {r["logic"]: r for r in runs}
    if kv and runs:
        ws = max(r["working_set_tokens"] for r in runs)
        shared = max(r["shared_prompt_tokens"] for r in runs)
        users = config["num_users"]
        per_user = (ws - shared) / max(users, 1)
        held = (kv - shared) / per_user if per_user > 0 else 0.0
        print(f"all users' conversations: {ws} tokens ({shared} shared, {per_user:.0f} a user), "
              f"{ws / kv:.2f}x one replica's KV cache ({kv} tokens), which holds {held:.1f} of "
              f"the {users} users' conversations")  # fmt: skip
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
    p.add_argument("--shared-system-prompt", type=int, default=100, help="words")
    p.add_argument("--user-history-prompt", type=int, default=200, help="words")
    p.add_argument("--answer-len", type=int, default=16, help="tokens")
    p.add_argument("--qps", type=float, default=0.5)
    p.add_argument("--routing-logics", default=",".join(LOGICS))
    p.add_argument("--kill-one-halfway", action="store_true")
    p.add_argument("--two-routers", action="store_true", help="also prefix-aware behind 2 routers")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--kv-gib", type=float, default=0.11, help="KV cache per replica")
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
    load_start = os.getloadavg()
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
    loads = {"load_avg_start": load_start, "load_avg_end": os.getloadavg()}
    summary = {"config": {**config, "kv_cache_tokens_per_replica": kv, **loads}, "results": results}
    print_summary(results, kv, config)
    print(f"total wall time: {time.monotonic() - t_start:.0f} s; load average (1, 5, 15 min) "
          f"{' '.join(f'{x:.1f}' for x in load_start)} at the start, "
          f"{' '.join(f'{x:.1f}' for x in loads['load_avg_end'])} at the end")  # fmt: skip
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
