"""Online serving benchmark against any OpenAI-compatible server, after `vllm bench serve`.

Streams every request and reports throughput and latency (TTFT, TPOT, ITL, end to end):

    python tools/bench_serving.py --base-url http://127.0.0.1:8000 --dataset random \\
        --num-prompts 64 --request-rate 4 --random-input-len 128 --random-output-len 64 \\
        --ignore-eos --json out.json --plot out.png

It sends requests only to --base-url, and stops after --num-prompts of them. The machine may
be shared: it also reports the CPU time other processes (not the server, not this tool) took.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.cpu_noise import CpuNoise  # noqa: E402

# Random token ids are drawn above the special tokens of common vocabularies, below 10k so
# that they exist in every vocabulary worth benchmarking.
_TOKEN_ID_RANGE = (100, 10_000)
# Words that are one token each (with their leading space) in GPT-2, Llama and SmolLM BPEs.
_WORDS = (
    "the of and to in is was for on that with as by at from his an were are which this be "
    "or has had one first new after also who its but their not have two time all been other "
    "when there more into some most between many can city world over these during school "
    "three where about year state may would only under while known united such then both "
    "later before people through well made called since used each team part found work"
).split()


@dataclass
class Request:
    prompt: str | list[int] | list[dict]  # text, token ids, or chat messages
    output_len: int
    input_len: int  # as generated or estimated; the server's usage replaces it when given
    structured: dict | None = None  # vLLM's structured_outputs body field, if any


@dataclass
class Result:
    ok: bool
    input_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    start: float = 0.0
    error: str = ""


# --structured: what constrains a structured request. The json and regex ones cannot end
# before max_tokens (at least 256 strings, or words), so that output lengths match plain
# requests run with --ignore-eos and throughputs compare like for like.
STRUCTURED = {
    "json": {
        "json": {
            "type": "object",
            "properties": {
                "words": {"type": "array", "items": {"type": "string"}, "minItems": 256}
            },
            "required": ["words"],
        }
    },
    "regex": {"regex": "([a-z]+ ){256,}"},
    "choice": {"choice": ["yes", "no", "maybe", "it depends"]},
}

# ---------------------------------------------------------------- datasets


def random_prompt(
    rng: random.Random, n: int, as_tokens: bool, max_token_id: int = _TOKEN_ID_RANGE[1]
) -> str | list[int]:
    if as_tokens:
        return [rng.randrange(_TOKEN_ID_RANGE[0], max_token_id) for _ in range(n)]
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def make_requests(args: argparse.Namespace) -> list[Request]:
    """The benchmark's requests, deterministic for --seed; --structured-ratio of them spread
    evenly get the --structured constraint."""
    reqs = _make_requests(args)
    if args.structured is not None:
        for i, req in enumerate(reqs):
            if math.floor((i + 1) * args.structured_ratio) > math.floor(i * args.structured_ratio):
                req.structured = STRUCTURED[args.structured]
    return reqs


def _make_requests(args: argparse.Namespace) -> list[Request]:
    rng = random.Random(args.seed)
    chat = args.endpoint == "chat"
    if args.dataset in ("random", "sharegpt-like"):
        reqs = []
        for _ in range(args.num_prompts):
            if args.dataset == "random":
                n_in, n_out = args.random_input_len, args.random_output_len
            else:  # lengths like ShareGPT's: long-tailed prompts and answers
                n_in = min(1024, max(4, int(rng.lognormvariate(5.0, 1.0))))
                n_out = min(512, max(4, int(rng.lognormvariate(4.6, 0.9))))
            as_tokens = not chat and not args.random_words
            prompt = random_prompt(rng, n_in, as_tokens, args.max_token_id)
            if chat:
                prompt = [{"role": "user", "content": prompt}]
            reqs.append(Request(prompt, n_out, n_in))
        return reqs
    return load_jsonl(args.dataset, args, rng)


def load_jsonl(path: str, args: argparse.Namespace, rng: random.Random) -> list[Request]:
    """Lines of {"prompt"} or {"messages"} or ShareGPT {"conversations"}, with an optional
    "max_tokens"/"output_len"; cycled or sampled to --num-prompts."""
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(_row_request(json.loads(line), args))
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{path}:{lineno}: cannot read a request: {e}") from None
    if not rows:
        raise SystemExit(f"{path} holds no requests")
    rng.shuffle(rows)
    return [rows[i % len(rows)] for i in range(args.num_prompts)]


def _row_request(row: dict, args: argparse.Namespace) -> Request:
    out = int(row.get("max_tokens") or row.get("output_len") or args.random_output_len)
    if "conversations" in row:
        turns = row["conversations"]
        text = next(t["value"] for t in turns if t.get("from") in ("human", "user"))
    elif "messages" in row:
        msgs = row["messages"]
        text = " ".join(m["content"] for m in msgs)
        if args.endpoint == "chat":
            return Request(msgs, out, len(text.split()))
    else:
        text = row["prompt"]
    prompt = [{"role": "user", "content": text}] if args.endpoint == "chat" else text
    return Request(prompt, out, len(text.split()))


# ---------------------------------------------------------------- one request


def request_body(args: argparse.Namespace, req: Request) -> dict:
    body = {"model": args.model, "max_tokens": req.output_len, "stream": True}
    body["stream_options"] = {"include_usage": True}
    body["temperature"] = args.temperature
    if args.ignore_eos:
        body["ignore_eos"] = True
    body["messages" if args.endpoint == "chat" else "prompt"] = req.prompt
    if req.structured is not None:
        body["structured_outputs"] = req.structured
    return body


async def send(client: httpx.AsyncClient, args: argparse.Namespace, req: Request) -> Result:
    """Stream one request; time its first token, the gaps between chunks, and its end."""
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    res = Result(ok=False, input_tokens=req.input_len, start=time.perf_counter())
    last, chunks = res.start, 0
    try:
        async with client.stream("POST", path, json=request_body(args, req)) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    res.error = str(data["error"].get("message"))[:200]
                    return res
                if data.get("usage"):
                    res.input_tokens = data["usage"]["prompt_tokens"]
                    res.output_tokens = data["usage"]["completion_tokens"]
                if not _has_text(data):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    res.ttft = now - res.start
                else:
                    res.itls.append(now - last)
                last, chunks = now, chunks + 1
        res.e2e = time.perf_counter() - res.start
        res.output_tokens = res.output_tokens or chunks  # no usage: one token per chunk
        res.ok = chunks > 0
        res.error = "" if res.ok else "no text in the stream"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
    return res


def _has_text(data: dict) -> bool:
    for c in data.get("choices") or ():
        if c.get("text") or (c.get("delta") or {}).get("content"):
            return True
    return False


# ---------------------------------------------------------------- the run


async def run(args: argparse.Namespace, reqs: list[Request]) -> tuple[list[Result], float]:
    """Send the requests with Poisson arrivals (or all at once), at most --max-concurrency."""
    rng = random.Random(args.seed + 1)
    limit = asyncio.Semaphore(args.max_concurrency or len(reqs))
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    conns = httpx.Limits(max_connections=args.max_concurrency or len(reqs) + 1)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(
        base_url=args.base_url, timeout=timeout, limits=conns, headers=headers
    ) as client:

        async def limited(req: Request) -> Result:
            async with limit:
                return await send(client, args, req)

        tasks = []
        t0 = time.perf_counter()
        for req in reqs:
            tasks.append(asyncio.create_task(limited(req)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.input_tokens for r in ok)
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [x for r in ok for x in r.itls],
        "e2el": [r.e2e for r in ok],
    }
    s: dict = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    for name, xs in series.items():
        s[f"mean_{name}_ms"] = 1000 * sum(xs) / len(xs) if xs else 0.0
        for label, p in (("median", 50), ("p90", 90), ("p99", 99)):
            s[f"{label}_{name}_ms"] = 1000 * percentile(xs, p)
    s["errors"] = sorted({r.error for r in results if not r.ok})[:5]
    return s


def print_report(s: dict) -> None:
    print(f"{' Serving Benchmark Result ':=^60}")
    rows = [
        ("Successful requests", s["completed"]),
        ("Failed requests", s["failed"]),
        ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
        ("Total input tokens", s["total_input_tokens"]),
        ("Total generated tokens", s["total_output_tokens"]),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}"),
    ]
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):  # fmt: skip
        rows.append((f"--- {title} ---", None))
        for label in ("mean", "median", "p99"):
            rows.append(
                (f"{label.capitalize()} {name.upper()} (ms)", f"{s[f'{label}_{name}_ms']:.2f}")
            )
    rows.append(("Other processes' CPU (s)", f"{s['other_cpu_s']:.2f} ({s['other_cpu_pct']:.1f}%)"))
    for name, value in rows:
        print(name if value is None else f"{name:<40}{value:>20}")
    for err in s["errors"]:
        print(f"error: {err}")
    print("=" * 60)


def plot(s: dict, results: list[Result], t_start: float, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); no plot drawn")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = ["ttft", "tpot", "itl", "e2el"]
    for i, label in enumerate(("median", "p90", "p99")):
        ax1.bar(
            [j + 0.25 * i for j in range(4)],
            [s[f"{label}_{n}_ms"] for n in names],
            0.25,
            label=label,
        )
    ax1.set_xticks([j + 0.25 for j in range(4)], [n.upper() for n in names])
    ax1.set_yscale("log")
    ax1.set_ylabel("latency (ms)")
    ax1.legend()
    ax1.set_title("Latency percentiles")
    # Output tokens per second, in one-second bins by completion time.
    bins: dict[int, int] = {}
    for r in results:
        if r.ok:
            sec = int(r.start + r.e2e - t_start)
            bins[sec] = bins.get(sec, 0) + r.output_tokens
    xs = list(range(max(bins, default=0) + 1))
    ax2.plot(xs, [bins.get(x, 0) for x in xs], marker=".")
    ax2.set_xlabel("time (s)")
    ax2.set_ylabel("output tokens completed per second")
    ax2.set_title(f"Throughput (mean {s['output_throughput']:.1f} tok/s)")
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


# ---------------------------------------------------------------- setup


def find_listener_pid(base_url: str) -> int | None:
    """The local process listening on the URL's port (Linux /proc), for the CPU accounting."""
    parts = urlsplit(base_url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in list(f)[1:]:
                    cols = line.split()
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(cols[9])
        except OSError:
            continue
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, started from any of its threads (Linux /proc)."""
    found, stack = [], [pid]
    while stack:
        for path in glob.glob(f"/proc/{stack.pop()}/task/*/children"):
            try:
                with open(path) as f:
                    kids = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found += kids
            stack += kids
    return found


def resolve_model(args: argparse.Namespace) -> str:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        r = httpx.get(f"{args.base_url}/v1/models", headers=headers, timeout=10.0)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise SystemExit(f"cannot list the models at {args.base_url}/v1/models: {e}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--dataset", default="random", help="random | sharegpt-like | FILE.jsonl")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="req/s, Poisson; inf: all at once"
    )
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-words", action="store_true", help="random: words, not token ids")
    p.add_argument(
        "--max-token-id",
        type=int,
        default=_TOKEN_ID_RANGE[1],
        help="random token-id prompts: ids below this (default %(default)s; a small vocabulary's size)",
    )
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--server-pid", type=int, default=None, help="default: the local listener")
    p.add_argument(
        "--structured",
        choices=sorted(STRUCTURED),
        default=None,
        help="constrain requests with vLLM's structured_outputs (json schema, regex, choice)",
    )
    p.add_argument(
        "--structured-ratio",
        type=float,
        default=1.0,
        help="with --structured: the fraction of requests constrained (default: all)",
    )
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--plot", default=None, metavar="PATH.png")
    args = p.parse_args(argv)
    for name in ("num_prompts", "random_input_len", "random_output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_token_id <= _TOKEN_ID_RANGE[0]:
        p.error(f"--max-token-id must be above {_TOKEN_ID_RANGE[0]}, got {args.max_token_id}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        p.error("--max-concurrency must be at least 1")
    if not 0.0 <= args.structured_ratio <= 1.0:
        p.error("--structured-ratio must be in [0, 1]")
    if not args.request_rate > 0:
        p.error("--request-rate must be positive (or inf)")
    if args.dataset not in ("random", "sharegpt-like") and not os.path.isfile(args.dataset):
        p.error(f"--dataset {args.dataset!r} is neither random, sharegpt-like nor a file")
    args.base_url = args.base_url.rstrip("/")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.model = args.model or resolve_model(args)
    reqs = make_requests(args)
    # One request first, untimed: fail fast on a wrong URL, model or key.
    first = Request(reqs[0].prompt, 4, reqs[0].input_len, reqs[0].structured)
    probe = asyncio.run(run(args, [first]))[0][0]
    if not probe.ok:
        raise SystemExit(f"the first test request failed: {probe.error}")
    server_pid = args.server_pid or find_listener_pid(args.base_url)
    print(f"{len(reqs)} requests to {args.base_url} ({args.model}), rate {args.request_rate}, "
          f"max concurrency {args.max_concurrency}, server pid {server_pid}")  # fmt: skip
    # The server's processes by name: CpuNoise follows children of main threads only, and
    # an engine process may be started from another thread.
    ours = (server_pid, *descendants(server_pid)) if server_pid else ()
    with CpuNoise(extra_pids=ours) as noise:
        t_start = time.perf_counter()
        results, duration = asyncio.run(run(args, reqs))
    s = summarize(results, duration)
    s["other_cpu_s"] = noise.other_cpu_s
    s["other_cpu_pct"] = 100.0 * noise.other_cpu_s / max(1e-9, noise.wall_s * (os.cpu_count() or 1))
    s["server_pid"] = server_pid
    s["config"] = {k: v for k, v in vars(args).items() if k not in ("api_key",)}
    s["config"]["request_rate"] = str(args.request_rate)
    print_report(s)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s | {"requests": [asdict(r) for r in results]}, f, indent=1)
        print(f"results written to {args.json}")
    if args.plot:
        plot(s, results, t_start, args.plot)
    return 0 if s["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
