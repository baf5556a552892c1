"""The default GGUF on CUDA: int4 layers (models/quant_cuda.py) against the dequantized path.

Loads the model in this process to count its int4 layers and weight bytes, then runs our LLM
(an EngineCore process) twice, quantized (the default) and with --quantization none (every
weight dequantized to bf16): greedy tokens of a few prompts, compared, and the new tokens
per second of one stream and of a batch (a generate call's wall time, its prefill included). The two paths' weights differ by the bf16 rounding of the blocks'
scales, so their greedy tokens may part after a while: the report says where.

    python tools/check_quant_cuda.py --json OUT.json            # on a GPU (tools/gpu_check.sh)
    python tools/check_quant_cuda.py --device cpu --new-tokens 4   # a CPU rehearsal
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    if args.new_tokens < 1 or args.batch < 1:
        ap.error(f"--new-tokens and --batch must be >= 1, got {args.new_tokens}, {args.batch}")
    report: dict = {"device": args.device, "new_tokens": args.new_tokens}
    report["models"] = model_facts(args.device)
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
    summary = {k: v for k, v in report.items() if k not in ("int4", "dequantized_bf16")}
    print(json.dumps(summary, indent=1))
    for name in ("int4", "dequantized_bf16"):
        rates = {k: round(v, 1) for k, v in report[name].items() if k.endswith("tok_s")}
        print(name, rates)
    if args.device == "cuda" and m["int4"]["int4_layers"] == 0:
        print("the default GGUF loaded no int4 layer on CUDA", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
