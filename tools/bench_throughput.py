"""Offline throughput: ringserve's LLM against transformers, vLLM and llama.cpp's server.

All run the same seeded synthetic workload in one run, one after the other (never at the
same time: on a 2-core machine they would slow each other), on the same model and dtype.
`single` is one stream (a 256-token prompt, 256 new tokens); llama.cpp runs the GGUF itself.

    python tools/bench_throughput.py --workload batch32 --json out.json
    python tools/bench_throughput.py --workload single --skip-hf --llamacpp-server PATH
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.cpu_noise import CpuNoise  # noqa: E402

# Token ids drawn for synthetic prompts: above the special tokens of Llama-family vocabularies.
_FIRST_ORDINARY_ID = 100


def make_workload(name: str, vocab_size: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, new tokens) per request, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    if name == "batch32":
        lens = np.linspace(32, 512, 32).round().astype(int)
        outs = [128] * 32
    elif name == "sharegpt-like":
        lens = np.clip(rng.lognormal(mean=5.0, sigma=1.0, size=200), 4, 1024).astype(int)
        outs = np.clip(rng.lognormal(mean=4.6, sigma=0.9, size=200), 4, 512).astype(int).tolist()
    elif name == "single":  # one stream: decode speed
        lens, outs = np.array([256]), [256]
    elif name == "tiny":  # a smoke run for tests and quick checks
        lens, outs = np.array([8, 16, 24, 32]), [8] * 4
    else:
        raise ValueError(f"unknown workload {name!r}")
    return [
        (rng.integers(_FIRST_ORDINARY_ID, vocab_size, size=int(n)).tolist(), int(o))
        for n, o in zip(lens, outs, strict=True)
    ]


def run_ringserve(args, workload) -> dict:
    from frontend import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        quantization=args.quantization,
    )
    startup = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": p} for p, _ in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in workload]
    # Warm the process (allocator, first-use paths) with a tiny request, untimed.
    llm.generate(
        [{"prompt_token_ids": workload[0][0][:8]}], SamplingParams(max_tokens=4), use_tqdm=False
    )
    llm.reset_prefix_cache()
    with CpuNoise(extra_pids=(llm.engine.proc.pid,)) as noise:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
    new_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    llm.close()
    return {
        "engine": "ringserve",
        "elapsed_s": elapsed,
        "new_tokens": new_tokens,
        "new_tok_per_s": new_tokens / elapsed,
        "startup_s": startup,
        "other_cpu_s": noise.other_cpu_s,
        "noise": noise.summary(),
    }


_VLLM_SCRIPT = r"""
import json, sys, time
from vllm import LLM, SamplingParams
spec = json.load(open(sys.argv[1]))
if __name__ == "__main__":
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=2048, skip_tokenizer_init=True,
              seed=0, enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": p} for p, _ in spec["workload"]]
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True, detokenize=False)
              for _, o in spec["workload"]]
    llm.generate([{"prompt_token_ids": spec["workload"][0][0][:8]}],
                 SamplingParams(max_tokens=4, detokenize=False), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    print("RESULT", json.dumps({"elapsed_s": elapsed,
          "new_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}), flush=True)
"""


def run_vllm(args, workload) -> dict:
    """vLLM's offline LLM on the same prompts, from its own virtual environment."""
    import subprocess
    import tempfile

    from tools.hf_reference import dequantized_hf_dir
    from tools.peers import peer_env

    # The settings ../shared/peers/README.md gives for vLLM's CPU build on these machines.
    env = peer_env(
        VLLM_CPU_KVCACHE_SPACE="2",
        VLLM_CPU_OMP_THREADS_BIND=f"0-{(os.cpu_count() or 1) - 1}",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
    )
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, script = os.path.join(tmp, "spec.json"), os.path.join(tmp, "run_vllm.py")
        with open(spec_path, "w") as f:
            json.dump(
                {
                    "model": dequantized_hf_dir(args.model),
                    "dtype": args.dtype,
                    "workload": workload,
                },
                f,
            )
        with open(script, "w") as f:
            f.write(_VLLM_SCRIPT)
        proc = subprocess.Popen(
            [args.vllm_python, script, spec_path],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            cwd=tmp,
        )
        with CpuNoise(extra_pids=(proc.pid,)) as noise:
            out, _ = proc.communicate()
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"vLLM run failed with exit code {proc.returncode}")
    r = json.loads(line[len("RESULT ") :])
    return {
        "engine": "vllm",
        "elapsed_s": r["elapsed_s"],
        "new_tokens": r["new_tokens"],
        "new_tok_per_s": r["new_tokens"] / r["elapsed_s"],
        "other_cpu_s": noise.other_cpu_s,
        # The vLLM process's own start-up counts as ours here, so this reads low, never high.
        "noise": noise.summary(),
    }


def run_hf(args, workload, batch_size: int) -> dict:
    import torch

    from tools.hf_reference import load_hf_model

    # Plain (dequantized) weights in the benchmark's dtype: transformers as users run it.
    model = load_hf_model(args.model, args.dtype)
    pad_id = 0
    with CpuNoise() as noise:
        t0 = time.perf_counter()
        new_tokens = 0
        for start in range(0, len(workload), batch_size):
            batch = workload[start : start + batch_size]
            width = max(len(p) for p, _ in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (p, _) in enumerate(batch):  # left padding
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            max_new = max(o for _, o in batch)
            with torch.inference_mode():
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new,
                    min_new_tokens=max_new,
                    do_sample=False,
                    pad_token_id=pad_id,
                )
            # A static batch runs to its longest request; only the tokens asked for count.
            new_tokens += sum(o for _, o in batch)
        elapsed = time.perf_counter() - t0
    del model
    gc.collect()
    return {
        "engine": f"hf-transformers-static-{batch_size}",
        "elapsed_s": elapsed,
        "new_tokens": new_tokens,
        "new_tok_per_s": new_tokens / elapsed,
        "other_cpu_s": noise.other_cpu_s,
        "noise": noise.summary(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workload", default="batch32", choices=["batch32", "sharegpt-like", "single", "tiny"]
    )
    parser.add_argument(
        "--quantization",
        default=None,
        choices=["none", "int8", "int4"],
        help="ringserve's --quantization (default: the checkpoint's own: Q4_1 for the GGUF)",
    )
    parser.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2)")
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true", help="only run ringserve")
    parser.add_argument(
        "--vllm-python",
        default=None,
        help="also run vLLM, with this interpreter (a venv with vllm installed, outside the project)",
    )
    parser.add_argument(
        "--llamacpp-server",
        default=None,
        metavar="PATH",
        help="also run llama.cpp's llama-server binary (built outside the project) on the GGUF",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp's -t")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    from frontend.tokenizer import load_tokenizer

    vocab = len(load_tokenizer(args.model))
    workload = make_workload(args.workload, vocab, args.seed)
    print(
        f"workload {args.workload}: {len(workload)} requests, "
        f"{sum(len(p) for p, _ in workload)} prompt tokens, {sum(o for _, o in workload)} new tokens, "
        f"dtype {args.dtype}",
        flush=True,
    )
    results = [run_ringserve(args, workload)]
    print(f"  ringserve done: {results[0]['new_tok_per_s']:.1f} new tok/s", flush=True)
    if args.vllm_python:
        results.append(run_vllm(args, workload))
        print(f"  vllm done: {results[-1]['new_tok_per_s']:.1f} new tok/s", flush=True)
    if args.llamacpp_server:
        from engine_core.model_files import resolve_model
        from tools.llamacpp_bench import run_llamacpp

        gguf_path = resolve_model(args.model).gguf_path
        if gguf_path is None:
            parser.error("--llamacpp-server needs a GGUF model (the default one is).")
        results.append(run_llamacpp(args.llamacpp_server, gguf_path, workload, args.threads))
        print(f"  llama.cpp done: {results[-1]['new_tok_per_s']:.1f} new tok/s", flush=True)
    if not args.skip_hf:
        results.append(run_hf(args, workload, args.hf_batch_size))
    base = results[-1]["new_tok_per_s"]
    print(f"\n{'engine':<28} {'new tokens':>10} {'seconds':>9} {'new tok/s':>10} {'ratio':>7}")
    for r in results:
        print(
            f"{r['engine']:<28} {r['new_tokens']:>10} {r['elapsed_s']:>9.2f} "
            f"{r['new_tok_per_s']:>10.1f} {r['new_tok_per_s'] / base:>6.2f}x"
        )
    for r in results:
        print(f"  {r['engine']}: {r['noise']}")
    if args.json:
        out = {
            "workload": args.workload,
            "dtype": args.dtype,
            "cpu_count": os.cpu_count(),
            "results": results,
            # ringserve's new tok/s over each other engine's
            "ratios": {
                r["engine"]: results[0]["new_tok_per_s"] / r["new_tok_per_s"] for r in results[1:]
            },
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
