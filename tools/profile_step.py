"""Where one decode step of the default model goes: per layer type, attention, small ops, sampler.

Loads the model as the engine does (the default Q4_1 GGUF, fp32 activations), prefills a
prompt, then times decode steps at batch `--rows` with a perf_counter around every module
call, grouped by what the module is (qkv, o, gate_up, down, lm_head, attention, norms...).
"other" is the step's time outside the timed modules: the Python around them, the rotary
tables, the embedding lookup's callers. The sampler is timed on the step's logits. Each
figure is the best over the timed steps' sums divided by their count (the machine may be
shared: take the best of several runs).

    python tools/profile_step.py [--threads 2] [--rows 1] [--context 256] [--steps 32]
    python tools/profile_step.py --query-len 6   # verify steps: 1 + 5 drafts a row
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_core.attention.torch_paged import AttentionMetadata  # noqa: E402
from engine_core.config import EngineConfig  # noqa: E402
from engine_core.models.llama import LlamaAttention  # noqa: E402
from engine_core.models.loader import load_model  # noqa: E402
from engine_core.protocol import SamplingParams  # noqa: E402
from engine_core.sample.sampler import Sampler, SamplingMetadata  # noqa: E402

BLOCK = 16


def _categories(model: torch.nn.Module) -> dict[str, str]:
    names: dict[str, str] = {}
    for name, _ in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"):
            names[name] = last
        elif last in ("input_layernorm", "post_attention_layernorm") or name == "norm":
            names[name] = "rms_norm"
        elif name == "embed_tokens":
            names[name] = "embedding"
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1, help="decode rows a step")
    ap.add_argument("--context", type=int, default=256, help="prompt tokens before decoding")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument(
        "--query-len",
        type=int,
        default=1,
        help="tokens a row a step, all of them sampled (a speculative verify row: 1 + drafts)",
    )
    ap.add_argument("--quantization", default=None)
    ap.add_argument(
        "--dtype",
        default="float32",
        help="the engine's --dtype (bfloat16 on an AVX512-BF16 CPU: bf16 matmuls past 12 rows)",
    )
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time per thread (a busy machine's waits left out; "
        "with 2 threads it counts OpenMP's spinning as work)",
    )
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    loaded = load_model(
        EngineConfig(dtype=args.dtype, quantization=args.quantization), torch.device("cpu")
    )
    model, cfg = loaded.model, loaded.config
    qlen = args.query_len
    n_blocks = -(-(args.context + args.steps * qlen + 2) // BLOCK)
    kv_shape = (cfg.num_layers, 2, n_blocks * args.rows, BLOCK, cfg.num_kv_heads, cfg.head_dim)
    kv = torch.zeros(kv_shape, dtype=loaded.kv_cache_dtype or loaded.compute_dtype)
    tables = np.arange(n_blocks * args.rows).reshape(args.rows, n_blocks)
    totals: dict[str, float] = collections.defaultdict(float)
    stack: list[float] = []

    def timed(cat: str, fn):
        def run(*a, **kw):
            t = clock()
            stack.append(0.0)
            out = fn(*a, **kw)
            dt = clock() - t
            inner = stack.pop()
            totals[cat] += dt - inner  # a module's own time, without the timed ones inside
            if stack:
                stack[-1] += dt
            return out

        return run

    cats = _categories(model)
    for name, module in model.named_modules():
        if name in cats:
            module.forward = timed(cats[name], module.forward)
    backend = model.attn_backend
    ops = backend.ops
    for op in ("rotate", "silu_and_mul", "rope_tables"):
        setattr(ops, op, timed(op, getattr(type(ops), op).__get__(ops)))

    class TimedBackend:
        """The model's backend with its calls timed as `attention`."""

        def __init__(self) -> None:
            self.ops = ops
            self.call = timed("attention", backend.__call__)

        def __call__(self, *a):
            return self.call(*a)

    timed_backend = TimedBackend()
    for module in model.modules():
        if isinstance(module, LlamaAttention):
            module.attn = timed_backend  # type: ignore[assignment]
    sampler = Sampler()
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, cfg.vocab_size, size=args.context)

    def step(ids: np.ndarray, computed: int, qlen: int) -> torch.Tensor:
        meta = AttentionMetadata.build(
            np.full(args.rows, qlen), np.full(args.rows, computed), tables, BLOCK
        )
        hidden = model(torch.from_numpy(ids), meta, kv)
        return model.compute_logits(hidden)  # every position: a verify step samples them all

    best: dict[str, float] = {}
    with torch.inference_mode():
        for r in range(args.rows):  # one prefill a row, untimed
            meta = AttentionMetadata.build(
                np.array([args.context]), np.array([0]), tables[r : r + 1], BLOCK
            )
            model(torch.from_numpy(prompt), meta, kv)
        ids = np.full(args.rows * qlen, 100)
        runs = []
        n = args.rows * qlen
        for i in range(args.steps):
            totals.clear()
            t0 = clock()
            logits = step(ids, args.context + i * qlen, qlen)
            t1 = clock()
            md = SamplingMetadata.build(
                [SamplingParams(temperature=0.0)] * n,
                [[0]] * n,
                [[]] * n,
                [None] * n,
                cfg.vocab_size,
                torch.device("cpu"),
            )
            ids = sampler(logits, md).token_ids.numpy().astype(np.int64).reshape(-1)
            t2 = clock()
            totals["step"] = t1 - t0
            totals["sampler"] = t2 - t1
            runs.append(dict(totals))
    keys = [k for k in runs[0] if k != "step"]
    for k in keys + ["step"]:
        best[k] = float(np.median([r.get(k, 0.0) for r in runs[len(runs) // 4 :]]))
    other = best["step"] - sum(v for k, v in best.items() if k not in ("step", "sampler"))
    print(
        f"threads {args.threads}, rows {args.rows} x {qlen} tokens, context {args.context}, "
        f"{args.clock} clock: median of steps"
    )
    order = sorted(keys, key=lambda k: -best[k])
    for k in order:
        print(f"  {k:14s} {best[k] * 1e3:7.2f} ms  {best[k] / best['step'] * 100:5.1f}%")
    print(f"  {'other':14s} {other * 1e3:7.2f} ms  {other / best['step'] * 100:5.1f}%")
    print(f"  {'step (model)':14s} {best['step'] * 1e3:7.2f} ms  + sampler")


if __name__ == "__main__":
    main()
