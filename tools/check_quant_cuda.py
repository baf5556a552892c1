"""The default GGUF on CUDA: int4 layers (models/quant_cuda.py) against the dequantized path.

Loads the model in this process to count its int4 layers and weight bytes, then runs our LLM
(an EngineCore process) twice, quantized (the default) and with --quantization none (every
weight dequantized to bf16): greedy tokens of a few prompts, compared, and the new tokens
per second of one stream and of a batch (a generate call's wall time, its prefill included).
It also times one int4 layer against bf16 `F.linear` at 1 to 4,096 rows on three models'
gate/up shapes: where the int4 kernel stops paying. The two paths' weights differ by the bf16 rounding of the blocks'
scales, so their greedy tokens may part after a while: the report says where.

    python tools/check_quant_cuda.py --json OUT.json            # on a GPU (tools/gpu_check.sh)
    python tools/check_quant_cuda.py --device cpu --new-tokens 4   # a CPU rehearsal
    python tools/check_quant_cuda.py --cpu-twin --new-tokens 32   # int4 numerics vs fp32, CPU
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import torch

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the mountains,",
    "def fibonacci(n):",
]


def model_facts(device: str) -> dict:
    """Int4 layers and weight bytes of the default GGUF loaded both ways, in this process."""
    from engine_core.config import EngineConfig
    from engine_core.models import quant_cuda
    from engine_core.models.loader import load_model

    facts = {}
    for name, quantization in (("int4", None), ("dequantized", "none")):
        cfg = EngineConfig(dtype="bfloat16", quantization=quantization, device=device)
        model = load_model(cfg, torch.device(device)).model
        layers = sum(isinstance(m, quant_cuda.Int4Linear) for m in model.modules())
        facts[name] = {"int4_layers": layers, "weight_bytes": model.weight_bytes()}
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return facts


# (in, out) of the gate/up projection of SmolLM2-135M, Llama-3.2-1B and Llama-3-8B
LAYER_SHAPES = [(576, 3072), (2048, 16384), (4096, 28672)]
LAYER_ROWS = [1, 16, 128, 1024, 4096]  # decode batches to prefill chunks


def _seconds_per_call(fn, reps: int, device: str) -> float:
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def layer_timings(device: str, shapes: list, rows: list[int], reps: int) -> list[dict]:
    """One int4 layer against bf16 F.linear per shape and row count: where the int4 kernel
    stops paying (a prefill chunk of many rows may be faster dequantized)."""
    import torch.nn.functional as F

    from engine_core.models.quant_cuda import Int4Linear

    out = []
    for k, n in shapes:
        w = 0.02 * torch.randn(n, k, device=device)
        int4, dense = Int4Linear.quantize_rtn(w), w.to(torch.bfloat16)
        del w
        for m in rows:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            t4 = _seconds_per_call(functools.partial(int4, x), reps, device)
            td = _seconds_per_call(functools.partial(F.linear, x, dense), reps, device)
            out.append(
                {"in": k, "out": n, "rows": m, "int4_us": t4 * 1e6, "bf16_us": td * 1e6,
                 "int4_speedup": td / t4}
            )  # fmt: skip
    return out


def run_llm(quantization: str | None, args) -> dict:
    """Greedy tokens of PROMPTS and decode tok/s (1 stream, then the batch) of our LLM."""
    from engine_core.protocol import SamplingParams
    from frontend.llm import LLM

    n = args.new_tokens
    llm = LLM(
        dtype="bfloat16",
        device=args.device,
        quantization=quantization,
        max_num_seqs=max(len(PROMPTS), args.batch),
        max_model_len=512,
        enable_prefix_caching=False,
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
    try:
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm up
        tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
        rates = {}
        for batch in (1, args.batch):
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            t0 = time.perf_counter()
            outs = llm.generate(prompts, greedy, use_tqdm=False)
            seconds = time.perf_counter() - t0
            rates[f"batch{batch}_tok_s"] = sum(len(o.outputs[0].token_ids) for o in outs) / seconds
    finally:
        llm.close()
    return {"tokens": [list(t) for t in tokens], **rates}


def compare(int4: dict, dense: dict) -> dict:
    """Where the two paths' greedy tokens first part, per prompt, and the share identical."""
    first_diff, same = [], 0
    for a, b in zip(int4["tokens"], dense["tokens"], strict=True):
        d = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        first_diff.append(d)
        same += sum(x == y for x, y in zip(a, b, strict=True))
    total = sum(len(t) for t in int4["tokens"])
    return {"first_differing_token": first_diff, "identical_share": same / max(total, 1)}


def _greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """n greedy tokens of `model` (on the CPU) after prompt_ids: a prefill, then decode steps."""
    import numpy as np

    from engine_core.attention.torch_paged import AttentionMetadata

    cfg, block = model.config, 16
    kv = torch.zeros(cfg.num_layers, 2, 64, block, cfg.num_kv_heads, cfg.head_dim)
    table = np.arange(-(-(len(prompt_ids) + n) // block))[None]
    out: list[int] = []
    ids, done = prompt_ids, 0
    with torch.inference_mode():
        while len(out) < n:
            meta = AttentionMetadata.build(np.array([len(ids)]), np.array([done]), table, block)
            hidden = model(torch.tensor(ids), meta, kv)
            out.append(int(model.compute_logits(hidden[-1:])[0].argmax()))
            done, ids = done + len(ids), out[-1:]
    return out


def cpu_twin(n: int) -> dict:
    """The int4 layers on this CPU (the loader's CUDA hook forced, torch's _for_cpu ops)
    against the exact dequantized fp32 model: greedy tokens of PROMPTS."""
    from engine_core.config import EngineConfig
    from engine_core.models import loader, quant_cuda
    from frontend.tokenizer import load_tokenizer

    tok, cpu = load_tokenizer(None), torch.device("cpu")
    dense = loader.load_model(EngineConfig(dtype="float32", quantization="none"), cpu).model
    applies = quant_cuda.applies
    quant_cuda.applies = lambda *args: True
    try:
        int4 = loader.load_model(EngineConfig(dtype="float32"), cpu).model
    finally:
        quant_cuda.applies = applies
    ids = [tok.encode(p) for p in PROMPTS]
    return compare(
        {"tokens": [_greedy(int4, i, n) for i in ids]},
        {"tokens": [_greedy(dense, i, n) for i in ids]},
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--json", help="write the report here")
    ap.add_argument(
        "--cpu-twin",
        action="store_true",
        help="only: the int4 layers run on this CPU by torch's _for_cpu ops, against the "
        "dequantized fp32 model (greedy tokens)",
    )
    args = ap.parse_args(argv)
    if args.new_tokens < 1 or args.batch < 1:
        ap.error(f"--new-tokens and --batch must be >= 1, got {args.new_tokens}, {args.batch}")
    if args.cpu_twin:
        torch.set_num_threads(1)  # a shared 2-core machine: OpenMP barriers only cost
        print(json.dumps(cpu_twin(args.new_tokens)))
        return 0
    report: dict = {"device": args.device, "new_tokens": args.new_tokens}
    report["models"] = model_facts(args.device)
    if args.device == "cuda":
        report["layers"] = layer_timings("cuda", LAYER_SHAPES, LAYER_ROWS, reps=20)
    else:  # the CPU's int4 op is slow (and not what the CPU engine runs): the plumbing only
        report["layers"] = layer_timings("cpu", LAYER_SHAPES[:1], [1], reps=1)
    int4, dense = run_llm(None, args), run_llm("none", args)
    report |= {"int4": int4, "dequantized_bf16": dense, "greedy": compare(int4, dense)}
    for key in ("batch1_tok_s", f"batch{args.batch}_tok_s"):
        report[f"{key}_ratio"] = int4[key] / dense[key]
    m = report["models"]
    report["weight_bytes_ratio"] = m["int4"]["weight_bytes"] / m["dequantized"]["weight_bytes"]
    text = json.dumps(report, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    summary = {k: v for k, v in report.items() if k not in ("int4", "dequantized_bf16", "layers")}
    print(json.dumps(summary, indent=1))
    for r in report["layers"]:
        print(
            f"layer {r['in']}x{r['out']}, {r['rows']} rows: int4 {r['int4_us']:.1f} us, "
            f"bf16 {r['bf16_us']:.1f} us ({r['int4_speedup']:.2f}x)"
        )
    for name in ("int4", "dequantized_bf16"):
        rates = {k: round(v, 1) for k, v in report[name].items() if k.endswith("tok_s")}
        print(name, rates)
    if args.device == "cuda" and m["int4"]["int4_layers"] == 0:
        print("the default GGUF loaded no int4 layer on CUDA", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
