"""llama.cpp's `llama-server` on a throughput workload: started, fed, timed, stopped.

The same prompts (token ids) as the other engines, greedy, `ignore_eos` so that each request
makes exactly the tokens asked for; all requests are sent at once (the server's continuous
batching over `--parallel` slots), like `LLM.generate` on a list.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from tools.cpu_noise import CpuNoise
from tools.peers import peer_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with code {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"llama-server not healthy after {timeout} s")


def run_llamacpp(
    binary: str, gguf_path: str, workload: list[tuple[list[int], int]], threads: int
) -> dict:
    """Throughput of `binary` (llama-server) serving `gguf_path` on `workload`."""
    if not os.access(binary, os.X_OK):
        raise FileNotFoundError(f"--llamacpp-server {binary!r} is not an executable file.")
    slots = min(len(workload), 32)
    # Each slot gets ctx/slots tokens: room for the longest request.
    ctx = slots * max(len(p) + o for p, o in workload) + 64
    port = _free_port()
    cmd = [binary, "-m", gguf_path, "-t", str(threads), "-c", str(ctx), "-np", str(slots)]
    cmd += ["--port", str(port), "--host", "127.0.0.1", "--no-warmup"]
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=peer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_healthy(url, proc, timeout=120)
        startup = time.perf_counter() - t0

        def one(item: tuple[list[int], int]) -> dict:
            prompt, n = item
            body = {"prompt": prompt, "n_predict": n, "temperature": 0.0, "top_k": 1}
            body |= {"ignore_eos": True, "cache_prompt": False}
            return _post(url + "/completion", body, timeout=3600)

        one((workload[0][0][:8], 4))  # warm, untimed
        with (
            CpuNoise(extra_pids=(proc.pid,)) as noise,
            ThreadPoolExecutor(max_workers=slots) as pool,
        ):
            t0 = time.perf_counter()
            results = list(pool.map(one, workload))
            elapsed = time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    new_tokens = sum(int(r.get("tokens_predicted", 0)) for r in results)
    timings = [r.get("timings", {}) for r in results]
    return {
        "engine": "llama.cpp-server",
        "elapsed_s": elapsed,
        "new_tokens": new_tokens,
        "new_tok_per_s": new_tokens / elapsed,
        "startup_s": startup,
        # the server's own per-request figures (meaningful for the single-stream workload)
        "decode_tok_per_s": [t.get("predicted_per_second") for t in timings],
        "prefill_tok_per_s": [t.get("prompt_per_second") for t in timings],
        "other_cpu_s": noise.other_cpu_s,
        "noise": noise.summary(),
    }
