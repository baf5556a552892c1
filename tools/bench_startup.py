"""Start-up time of `python -m frontend`: to the first 200 on /health, and to a first request.

Each run starts the server (default model, a free port), polls /health every 10 ms, then
sends one greedy chat completion and times it; the server is stopped before the next run.
With several --tree folders (other checkouts, e.g. an older commit, each with its .venv)
the runs alternate between them, so that a shared machine's noise falls on all alike.

    python tools/bench_startup.py --runs 5 --json out.json
    python tools/bench_startup.py --runs 5 --tree . --tree /tmp/startup_old
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.cpu_noise import CpuNoise  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHAT = {
    "messages": [{"role": "user", "content": "Name three colours."}],
    "max_tokens": 16,
    "temperature": 0.0,
}
# Lines the server and its engine log during start-up, and what the table calls them.
_LOG_FIGURES = {
    "model_load_s": re.compile(r"model loaded in ([\d.]+) s"),
    "warmup_s": re.compile(r"warm-up done in ([\d.]+) s"),
    "ready_logged_s": re.compile(r"ready in ([\d.]+) s"),
    "engine_ready_at_s": re.compile(r"engine ready at ([\d.]+) s"),
    "tokenizer_at_s": re.compile(r"tokenizer at ([\d.]+) s"),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(tree: str, extra_args: list[str], timeout: float) -> dict:
    """Start the server in `tree`, time /health and a first request, stop it."""
    port = _free_port()
    python = os.path.join(tree, ".venv", "bin", "python")
    env = dict(os.environ, PYTHONPATH=tree)
    log = tempfile.NamedTemporaryFile(prefix="bench-startup-", suffix=".log", delete=False)
    cmd = [python, "-m", "frontend", "--port", str(port), *extra_args]
    url = f"http://127.0.0.1:{port}"
    result: dict = {"tree": tree}
    with CpuNoise() as noise:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            with httpx.Client(timeout=60.0) as client:
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"the server exited with {proc.returncode}")
                    if time.monotonic() - t0 > timeout:
                        raise TimeoutError(f"not ready within {timeout} s")
                    try:
                        if client.get(f"{url}/health", timeout=1.0).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.01)
                result["ready_s"] = time.monotonic() - t0
                t1 = time.monotonic()
                r = client.post(f"{url}/v1/chat/completions", json=_CHAT)
                r.raise_for_status()
                result["first_request_s"] = time.monotonic() - t1
                result["first_done_s"] = time.monotonic() - t0
                result["first_text"] = r.json()["choices"][0]["message"]["content"]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    result["other_cpu_s"] = noise.other_cpu_s
    result["other_cpu_pct"] = 100.0 * noise.other_cpu_s / max(1e-9, noise.wall_s * os.cpu_count())
    with open(log.name, errors="replace") as f:
        text = f.read()
    os.unlink(log.name)
    for key, pattern in _LOG_FIGURES.items():
        m = pattern.search(text)
        if m:
            result[key] = float(m.group(1))
    return result


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5, help="starts per tree")
    p.add_argument("--tree", action="append", help="a checkout to run (repeatable; default .)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for ready")
    p.add_argument("--json", help="write every run and the medians here")
    p.add_argument("server_args", nargs="*", help="extra `python -m frontend` flags (after --)")
    args = p.parse_args()
    trees = [os.path.abspath(t) for t in (args.tree or [REPO])]
    runs: dict[str, list[dict]] = {t: [] for t in trees}
    for i in range(args.runs):
        for tree in trees:  # alternating: the machine's noise falls on every tree alike
            r = one_run(tree, args.server_args, args.timeout)
            runs[tree].append(r)
            print(
                f"run {i + 1} {tree}: ready {r['ready_s']:.2f} s, first request "
                f"{r['first_request_s']:.2f} s, other processes {r['other_cpu_pct']:.0f}% "
                "of the machine",
                flush=True,
            )
    keys = ["ready_s", "first_request_s", "first_done_s", "model_load_s", "warmup_s"]
    keys += ["engine_ready_at_s", "tokenizer_at_s", "other_cpu_pct"]
    print("\nmedians of", args.runs, "runs")
    print("| tree | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    summary = {}
    for tree in trees:
        med = {k: _median(runs[tree], k) for k in keys}
        summary[tree] = med
        print(f"| {tree} | " + " | ".join(_fmt(med[k]) for k in keys) + " |")
    if len(trees) > 1:
        base = summary[trees[0]]["ready_s"]
        for tree in trees[1:]:
            other = summary[tree]["ready_s"]
            if base and other:
                print(f"ready: {trees[0]} takes {base / other:.2f}x the time of {tree}")
    texts = {r["first_text"] for rs in runs.values() for r in rs}
    print(f"first replies: {len(texts)} distinct text(s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "medians": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
