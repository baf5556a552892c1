"""Decode step time against the memory-bandwidth floor, and offline throughput against transformers.

A decode step reads every weight once and each request's K/V once, so its floor is
(weight bytes + KV bytes read) / device-to-device bandwidth, measured in the same run. The
runner is driven directly with SchedulerOutputs (chunked prefill of B prompts, then timed decode
steps), with and without CUDA graphs. With --hf the same shapes run end to end through our LLM
and through transformers' generate (and generate_batch, its continuous batching, where present).

    python tools/bench_decode.py --json decode.json      # on a GPU: the 1B and 8B shapes
    python tools/bench_decode.py --quick                 # the tiny shape on a CPU, seconds
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Everything here is local (configs, random weights): never wait on the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine_core.config import EngineConfig  # noqa: E402
from engine_core.protocol import (  # noqa: E402
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SamplingParams,
    SchedulerOutput,
)
from engine_core.worker.model_runner import ModelRunner  # noqa: E402
from tools.cpu_noise import CpuNoise  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# Prompt token ids are drawn from [3, vocab): random weights treat every id alike; 0-2 are the
# tiny config's pad/bos/eos.
_FIRST_ORDINARY_ID = 3
_GREEDY = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)


def config_path(name: str) -> str:
    """A config.json path from a name in tools/configs (llama-3-8b) or a path."""
    path = name if name.endswith(".json") else os.path.join(CONFIG_DIR, f"{name}.json")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))
        raise ValueError(f"no config {name!r}: give a config.json path or one of {known}.")
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device: torch.device) -> tuple[object, float]:
    """(fn(), milliseconds): CUDA events around it on a GPU, a host clock on a CPU."""
    _sync(device)
    if device.type != "cuda":
        t0 = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return out, start.elapsed_time(end)


def measure_bandwidth(device: torch.device, nbytes: int, reps: int = 20) -> dict:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (median)."""
    src = torch.randn(nbytes // 4, device=device)  # random data: zeros can run faster
    dst = torch.full_like(src, float("nan"))
    for _ in range(3):
        dst.copy_(src)
    times = [timed_ms(lambda: dst.copy_(src), device)[1] for _ in range(reps)]
    if not torch.equal(dst, src):
        raise RuntimeError("the bandwidth copy did not copy: the measurement is void.")
    ms = float(np.median(times))
    bytes_moved = 2 * src.numel() * src.element_size()
    return {"bytes_per_copy": bytes_moved, "median_ms": ms, "gb_per_s": bytes_moved / ms / 1e6}


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one decode step reads: all of them but an untied embedding table.

    The embedding lookup reads B rows, not the table; a tied table is read whole by the LM head.
    """
    embed = model.embed_tokens
    lm_head = model.lm_head
    shared = getattr(lm_head, "packed", None) is None and (
        lm_head.weight.data_ptr() == embed.data_ptr()
    )
    total = model.weight_bytes()
    return total if shared else total - embed.numel() * embed.element_size()


def kv_bytes_per_token(runner: ModelRunner) -> int:
    """K and V of one token in every layer, as the cache stores them."""
    cfg = runner.model_config
    return 2 * cfg.num_layers * runner.num_kv_heads * cfg.head_dim * runner.kv_cache.element_size()


# ------------------------------------------------------------------------------ the runner side


@dataclass(slots=True)
class _Request:
    req_id: str
    prompt: list[int]
    first_block: int  # the request's contiguous range of block ids starts here
    num_blocks: int = 0  # handed to the runner so far
    num_computed: int = 0
    sent: bool = False
    pending: int | None = None  # sampled, not yet sent back to the runner
    sampled: list[int] = field(default_factory=list)


class DecodeSession:
    """Drives a ModelRunner as the scheduler would: B prompts, chunked prefill, decode steps.

    Request i owns block ids [i * blocks_per_req, (i + 1) * blocks_per_req) and gets them as
    its tokens need them; num_computed_tokens and the sampled tokens go back each step.
    """

    def __init__(
        self, runner: ModelRunner, prompts: list[list[int]], blocks_per_req: int, chunk: int
    ) -> None:
        if len(prompts) * blocks_per_req > runner.num_blocks:
            raise ValueError(
                f"{len(prompts)} requests of {blocks_per_req} blocks need more than the "
                f"runner's {runner.num_blocks} KV blocks."
            )
        self.runner, self.chunk = runner, chunk
        self.block_size, self.blocks_per_req = runner.block_size, blocks_per_req
        self.requests = [_Request(f"r{i}", p, i * blocks_per_req) for i, p in enumerate(prompts)]

    def _new_blocks(self, req: _Request, num_tokens: int) -> list[int]:
        need = -(-num_tokens // self.block_size)
        if need > self.blocks_per_req:
            raise ValueError(f"{req.req_id} needs {need} blocks, more than it reserved.")
        ids = list(range(req.first_block + req.num_blocks, req.first_block + need))
        req.num_blocks = max(req.num_blocks, need)
        return ids

    def step(self, so: SchedulerOutput) -> None:
        """Run one step and take back what it sampled."""
        self.apply(so, self.runner.execute_model(so))

    def apply(self, so: SchedulerOutput, out: ModelRunnerOutput) -> None:
        """Advance every scheduled request past the step; keep the tokens it sampled."""
        for req in self.requests:
            req.num_computed += so.num_scheduled_tokens.get(req.req_id, 0)
        by_id = {r.req_id: r for r in self.requests}
        for req_id, token in zip(out.req_ids, out.sampled_token_ids, strict=True):
            by_id[req_id].pending = token
            by_id[req_id].sampled.append(token)

    def prefill(self) -> None:
        """Run every prompt through, max `chunk` tokens a step, until each has sampled once."""
        while any(r.num_computed < len(r.prompt) for r in self.requests):
            new, cached, scheduled, budget = [], [], {}, self.chunk
            for req in self.requests:
                n = min(len(req.prompt) - req.num_computed, budget)
                if n <= 0:
                    continue
                blocks = self._new_blocks(req, req.num_computed + n)
                if req.sent:
                    cached.append(CachedRequestData(req.req_id, [], blocks, req.num_computed))
                else:
                    new.append(
                        NewRequestData(
                            req.req_id, req.prompt, [], _GREEDY, blocks, req.num_computed
                        )
                    )
                    req.sent = True
                scheduled[req.req_id], budget = n, budget - n
            self.step(SchedulerOutput(new, cached, scheduled, sum(scheduled.values())))
        missing = [r.req_id for r in self.requests if r.pending is None]
        if missing:
            raise RuntimeError(f"the runner sampled nothing for {missing[:4]} after prefill.")

    def decode_output(self) -> SchedulerOutput:
        """The next decode step: each request's last sampled token goes back, one token each."""
        cached = []
        for r in self.requests:
            blocks = self._new_blocks(r, r.num_computed + 1)
            cached.append(CachedRequestData(r.req_id, [r.pending], blocks, r.num_computed))
            r.pending = None
        scheduled = {r.req_id: 1 for r in self.requests}
        return SchedulerOutput([], cached, scheduled, len(scheduled))

    def finish(self) -> None:
        """Drop every request from the runner (as the scheduler's finished_req_ids do)."""
        ids = [r.req_id for r in self.requests]
        self.runner.execute_model(SchedulerOutput([], [], {}, 0, finished_req_ids=ids))


def bench_runner(path: str, mode: str, args, bandwidth: dict) -> tuple[list[dict], dict]:
    """Decode rows for every batch size on one runner, and the tokens each batch sampled."""
    total = args.context + args.warmup_steps + args.steps + 1
    blocks_per_req = -(-total // args.block_size)
    max_batch = max(args.batches)
    config = EngineConfig(
        load_format="dummy",
        hf_config=path,
        dtype=args.dtype,
        enforce_eager=mode == "eager",
        max_num_seqs=max_batch,
        max_model_len=blocks_per_req * args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_gpu_blocks_override=max_batch * blocks_per_req,
        block_size=args.block_size,
        enable_prefix_caching=False,
        device=args.device,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    runner = ModelRunner(config)
    runner.warmup()  # as EngineCore does: graphs, if any, are ready after this
    startup = time.perf_counter() - t0
    graphs = runner.cuda_graphs is not None  # what the runner really does
    rows, tokens = [], {}
    for batch in args.batches:
        row, tokens[batch] = _bench_batch(runner, batch, blocks_per_req, args)
        weights, kv = row["weight_bytes_read"], row["kv_bytes_read"]
        row["floor_ms"] = (weights + kv) / (bandwidth["gb_per_s"] * 1e6)
        row["pct_of_floor"] = row["floor_ms"] / row["median_ms"] * 100
        rows.append(
            {
                "config": _name(path),
                "mode": mode,
                "cuda_graphs": graphs,
                **row,
                "startup_s": startup,
            }
        )
        print(_decode_line(rows[-1]), flush=True)
    del runner
    _free(torch.device(args.device))
    return rows, tokens


def _bench_batch(runner: ModelRunner, batch: int, blocks_per_req: int, args) -> tuple[dict, list]:
    rng = np.random.default_rng(args.seed + batch)
    vocab = runner.model_config.vocab_size
    prompts = rng.integers(_FIRST_ORDINARY_ID, vocab, size=(batch, args.context)).tolist()
    session = DecodeSession(runner, prompts, blocks_per_req, args.max_num_batched_tokens)
    session.prefill()
    for _ in range(args.warmup_steps):
        session.step(session.decode_output())
    times = []
    with CpuNoise() as noise:
        for _ in range(args.steps):
            # Only the runner's step is timed: the scheduler's share is outside, as are ours.
            so = session.decode_output()
            out, ms = timed_ms(functools.partial(runner.execute_model, so), runner.device)
            session.apply(so, out)
            times.append(ms)
    session.finish()
    # Timed step k attends over context + warmup + k + 1 tokens: take the mean over the steps.
    mean_ctx = args.context + args.warmup_steps + (args.steps - 1) / 2 + 1
    median = float(np.median(times))
    row = {
        "batch": batch,
        "context": args.context,
        "steps": args.steps,
        "median_ms": median,
        "p90_ms": float(np.percentile(times, 90)),
        "tok_per_s": batch / median * 1e3,
        "weight_bytes_read": decode_weight_bytes(runner.model),
        "weight_bytes_held": runner.model.weight_bytes(),
        "kv_bytes_read": int(batch * mean_ctx * kv_bytes_per_token(runner)),
        "other_cpu_s": noise.other_cpu_s,
        "noise": noise.summary(),
    }
    return row, [r.sampled for r in session.requests]


def _name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compare_tokens(a: dict, b: dict, prefix: int = 16) -> list[dict]:
    """Per batch: requests whose greedy tokens agree in both runs, wholly and in a prefix.

    bf16 on a GPU may pick another token where two logits nearly tie (a padded batch runs
    other GEMM tiles), after which the sequences part: the prefix count says how early.
    """
    out = []
    for batch in sorted(set(a) & set(b)):
        pairs = list(zip(a[batch], b[batch], strict=True))
        out.append(
            {
                "batch": batch,
                "requests": len(pairs),
                "identical_requests": sum(x == y for x, y in pairs),
                f"same_first_{prefix}": sum(x[:prefix] == y[:prefix] for x, y in pairs),
            }
        )
    return out


# ------------------------------------------------------------------------------ reporting


_DECODE_HEADER = (
    f"\n{'config':<14} {'mode':<7} {'batch':>5} {'ctx':>6} {'median ms':>9} {'p90 ms':>9} "
    f"{'tok/s':>10} {'floor ms':>9} {'floor%':>7}"
)


def _decode_line(r: dict) -> str:
    return (
        f"{r['config']:<14} {r['mode']:<7} {r['batch']:>5} {r['context']:>6} "
        f"{r['median_ms']:>9.3f} {r['p90_ms']:>9.3f} {r['tok_per_s']:>10.1f} "
        f"{r['floor_ms']:>9.3f} {r['pct_of_floor']:>6.1f}%"
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return f"CPU {model} ({os.cpu_count()} cores)"


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


# Defaults of a full run and of --quick (the tiny config on a CPU); a flag given wins over both.
_FULL = dict(
    configs="llama-3.2-1b,llama-3-8b",
    batches=[1, 8, 64, 256],
    context=512,
    steps=32,
    warmup_steps=4,
    new_tokens=128,
    max_num_batched_tokens=8192,
)
_QUICK = dict(
    configs="tiny-llama",
    batches=[1, 4],
    context=24,
    steps=6,
    warmup_steps=2,
    new_tokens=8,
    max_num_batched_tokens=64,  # several prefill chunks, one spanning two requests
    device="cpu",
    bandwidth_mib=64,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--configs", help=f"names in tools/configs or paths (default {_FULL['configs']})")
    add("--batches", type=_positive_ints, help="batch sizes (default 1,8,64,256)")
    add("--context", type=int, help="prompt tokens per request (default 512)")
    add("--steps", type=int, help="timed decode steps per batch (default 32)")
    add("--warmup-steps", type=int, help="untimed decode steps first (default 4)")
    add("--modes", default="graphs,eager", help="graphs and/or eager; none: end to end only")
    add("--new-tokens", type=int, help="tokens per request in the end-to-end runs (default 128)")
    add("--max-num-batched-tokens", type=int, help="prefill chunk (default 8192)")
    add("--block-size", type=int, default=16)
    add("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    add("--device", choices=["cpu", "cuda"], help="default: cuda when there is one")
    add("--hf", action=argparse.BooleanOptionalAction, help="end-to-end runs (default: on CUDA)")
    add("--hf-cb", action=argparse.BooleanOptionalAction, default=True, help="generate_batch too")
    add("--bandwidth-mib", type=int, help="bandwidth copy size (default 1024 GPU, 256 CPU)")
    add("--seed", type=int, default=0)
    add("--quick", action="store_true", help="small defaults: the tiny config on a CPU")
    add("--json", help="write the results here")
    args = p.parse_args(argv)
    for key, value in (_QUICK if args.quick else _FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    for name in ("context", "steps", "new_tokens", "max_num_batched_tokens", "block_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup_steps < 0:
        p.error(f"--warmup-steps must be non-negative, got {args.warmup_steps}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("graphs", "eager")]
    if modes != ["none"] and (bad or not modes):
        p.error(f"--modes takes graphs and/or eager, or none; got {args.modes!r}")
    args.modes = [] if modes == ["none"] else modes
    try:
        args.config_paths = [config_path(c.strip()) for c in args.configs.split(",") if c.strip()]
    except ValueError as e:
        p.error(str(e))
    args.hf = args.device == "cuda" if args.hf is None else args.hf
    if not args.modes and not args.hf:
        p.error("--modes none and --no-hf leave nothing to run")
    args.bandwidth_mib = args.bandwidth_mib or (1024 if args.device == "cuda" else 256)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print the tables; return (and with --json write) the results."""
    args = parse_args(argv)
    device = torch.device(args.device)
    bandwidth = measure_bandwidth(device, args.bandwidth_mib * 2**20)
    _free(device)
    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "args": {k: v for k, v in vars(args).items() if k != "config_paths"},
        "bandwidth": bandwidth,
        "rows": [],
        "greedy_graphs_vs_eager": [],
        "throughput": [],
        "ratios": [],
    }
    print(f"{result['device']}: copy {bandwidth['gb_per_s']:.1f} GB/s (read + written)")
    print(_DECODE_HEADER, flush=True)

    def save() -> None:  # after each part, so that a run cut short keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)

    for path in args.config_paths:
        config, tokens = _name(path), {}
        for mode in args.modes:
            rows, tokens[mode] = bench_runner(path, mode, args, bandwidth)
            result["rows"] += rows
            save()
        if len(tokens) == 2:
            greedy = compare_tokens(tokens["graphs"], tokens["eager"])
            result["greedy_graphs_vs_eager"] += [{"config": config, **g} for g in greedy]
        if args.hf:
            with open(path) as f:
                vocab = json.load(f)["vocab_size"]
            from tools import decode_e2e  # it imports this module: not at the top

            ours = decode_e2e.run_ours(path, vocab, args)
            result["throughput"] += [{"config": config, **r} for r in ours]
            save()
            e2e = ours + decode_e2e.run_hf(path, args)
            result["throughput"] += [{"config": config, **r} for r in e2e[len(ours) :]]
            result["ratios"] += [{"config": config, **r} for r in decode_e2e.throughput_ratios(e2e)]
        save()
    print_report(result)
    return result


def print_report(result: dict) -> None:
    """The tables, last in the output (a device run's reply keeps only its tail)."""
    print(f"\n{result['device']}, torch {result['torch']}")
    print(f"device-to-device copy: {result['bandwidth']['gb_per_s']:.1f} GB/s (read + written)")
    print(_DECODE_HEADER)
    for row in result["rows"]:
        print(_decode_line(row))
    if any(r["mode"] == "graphs" and not r["cuda_graphs"] for r in result["rows"]):
        print("(the runner captured no CUDA graphs here: the graphs rows ran eagerly)")
    for g in result["greedy_graphs_vs_eager"]:
        print(
            f"greedy tokens, graphs vs eager, {g['config']} batch {g['batch']}: "
            f"{g['identical_requests']}/{g['requests']} identical, "
            f"{g['same_first_16']}/{g['requests']} share their first 16"
        )
    if result["throughput"]:
        print(f"\n{'config':<14} {'engine':<18} {'batch':>5} {'new tok':>8} {'s':>8} {'tok/s':>10}")
    for r in result["throughput"]:
        if "skipped" in r:
            print(f"{r['config']:<14} {r['engine']:<18} skipped: {r['skipped']}")
            continue
        print(
            f"{r['config']:<14} {r['engine']:<18} {r['batch']:>5} {r['new_tokens']:>8} "
            f"{r['elapsed_s']:>8.2f} {r['tok_per_s']:>10.1f}"
        )
    for r in result["ratios"]:
        print(f"{r['config']} batch {r['batch']}: ringserve / {r['versus']} = {r['ratio']:.2f}x")
    if result["args"]["json"]:
        print(f"wrote {result['args']['json']}")


if __name__ == "__main__":
    main()
