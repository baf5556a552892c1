"""bench_decode's end-to-end half: offline throughput of our LLM and of transformers' generate.

The same dummy-weight shapes, prompts and output lengths run through our LLM (an EngineCore
process) and through transformers' `generate` and `generate_batch` (its continuous batching)
on the same device; tools/bench_decode.py calls these with --hf and reports the ratios.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time

import numpy as np
import torch

from engine_core.protocol import SamplingParams
from tools.bench_decode import _FIRST_ORDINARY_ID, _free, _sync
from tools.cpu_noise import CpuNoise


def save_word_tokenizer(vocab_size: int, path: str) -> None:
    """A tokenizer for the dummy model's whole vocabulary (id i reads "<i>"), saved in path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)


def _workload(vocab: int, batch: int, args) -> list[list[int]]:
    rng = np.random.default_rng(args.seed + 1000 + batch)
    return rng.integers(_FIRST_ORDINARY_ID, vocab, size=(batch, args.context)).tolist()


def _throughput_row(engine: str, batch: int, new_tokens: int, seconds: float, noise) -> dict:
    return {
        "engine": engine,
        "batch": batch,
        "new_tokens": new_tokens,
        "elapsed_s": seconds,
        "tok_per_s": new_tokens / seconds,
        "other_cpu_s": noise.other_cpu_s,
        "noise": noise.summary(),
    }


def run_ours(path: str, vocab: int, args) -> list[dict]:
    """Our LLM (EngineCore process, dummy weights): B prompts, exactly new_tokens each."""
    from frontend.llm import LLM

    n, max_batch = args.new_tokens, max(args.batches)
    max_model_len = args.context + n
    tok_dir = tempfile.mkdtemp(prefix="bench_decode_tokenizer_")
    save_word_tokenizer(vocab, tok_dir)
    llm = LLM(
        tokenizer=tok_dir,
        dtype=args.dtype,
        load_format="dummy",
        hf_config=path,
        device=args.device,
        max_num_seqs=max_batch,
        max_model_len=max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_gpu_blocks_override=max_batch * (-(-max_model_len // args.block_size) + 1),
        enable_prefix_caching=False,
        seed=args.seed,
    )
    params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
    rows = []
    try:
        llm.generate([[_FIRST_ORDINARY_ID] * 8], SamplingParams(max_tokens=4), use_tqdm=False)
        for batch in args.batches:
            prompts = [{"prompt_token_ids": p} for p in _workload(vocab, batch, args)]
            with CpuNoise(extra_pids=(llm.engine.proc.pid,)) as noise:
                t0 = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                seconds = time.perf_counter() - t0
            got = sum(len(o.outputs[0].token_ids) for o in outs)
            if got != batch * n:
                raise RuntimeError(f"ringserve generated {got} tokens, not {batch * n}.")
            rows.append(_throughput_row("ringserve", batch, got, seconds, noise))
    finally:
        llm.close()
        shutil.rmtree(tok_dir, ignore_errors=True)
    return rows


def run_hf(path: str, args) -> list[dict]:
    """transformers on the same device and dtype: generate (static batch), then generate_batch."""
    import transformers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    with open(path) as f:
        hf_config = LlamaConfig.from_dict(json.load(f))
    torch.manual_seed(args.seed)
    with device:  # random init on the device itself: an 8B init on the host takes minutes
        model = LlamaForCausalLM._from_config(hf_config, dtype=getattr(torch, args.dtype))
        model.eval()
    vocab, n = hf_config.vocab_size, args.new_tokens
    rows = []
    warm = torch.full((1, 8), _FIRST_ORDINARY_ID, device=device)
    with torch.inference_mode():
        model.generate(input_ids=warm, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for batch in args.batches:
        ids = torch.tensor(_workload(vocab, batch, args), device=device)
        try:
            with CpuNoise() as noise, torch.inference_mode():
                _sync(device)
                t0 = time.perf_counter()
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )
                _sync(device)
                seconds = time.perf_counter() - t0
        except torch.OutOfMemoryError as e:  # a result too: transformers cannot run this batch
            rows.append({"engine": "hf-generate", "batch": batch, "skipped": f"out of memory: {e}"})
            _free(device)
            continue
        got = (out.shape[1] - args.context) * batch
        rows.append(_throughput_row("hf-generate", batch, got, seconds, noise))
        del out
    if args.hf_cb:
        rows += _run_hf_cb(model, vocab, args, GenerationConfig)
    print(f"  transformers {transformers.__version__} done", flush=True)
    del model
    _free(device)
    return rows


def _run_hf_cb(model, vocab: int, args, generation_config_cls) -> list[dict]:
    """transformers' continuous batching (generate_batch), if this version has it."""
    import transformers

    if not hasattr(model, "generate_batch"):
        note = f"transformers {transformers.__version__} has no generate_batch"
        return [{"engine": "hf-generate-batch", "skipped": note}]
    n = args.new_tokens
    gen = generation_config_cls(max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # On a CPU it would size its cache from the host's memory (20 s of page faults here).
    cb_kwargs = {}
    if args.device == "cpu":
        try:
            from transformers.generation import ContinuousBatchingConfig
        except ImportError as e:  # an older transformers: its generate_batch takes no config
            note = f"transformers {transformers.__version__}: {e}"
            return [{"engine": "hf-generate-batch", "skipped": note}]
        blocks = max(args.batches) * (-(-(args.context + n) // 256) + 1)
        cb_kwargs["continuous_batching_config"] = ContinuousBatchingConfig(
            num_blocks=blocks, max_batch_tokens=args.max_num_batched_tokens
        )
    rows = []
    for batch in args.batches:
        inputs = _workload(vocab, batch, args)

        def call(inputs=inputs):
            return model.generate_batch(
                inputs=inputs,
                generation_config=gen,
                **cb_kwargs,
                persistent_manager=True,  # the timed call reuses the warmed-up manager
                progress_bar=False,
            )

        try:
            call()  # warm-up (CUDA graph capture, cache allocation), untimed
            with CpuNoise() as noise:
                t0 = time.perf_counter()
                outs = call()
                _sync(torch.device(args.device))
                seconds = time.perf_counter() - t0
        except Exception as e:  # the baseline failing is a result to report, not a crash
            note = f"{type(e).__name__}: {e}"
            rows.append({"engine": "hf-generate-batch", "batch": batch, "skipped": note})
            continue
        finally:
            destroy = getattr(model, "destroy_cached_continuous_batching_manager", None)
            if destroy is not None:  # not in every transformers that has generate_batch
                destroy()
        errors = [o.error for o in outs.values() if o.error]
        got = sum(len(o.generated_tokens) for o in outs.values())
        if errors or got != batch * n:
            note = f"generated {got} of {batch * n} tokens; errors: {errors[:2]}"
            rows.append({"engine": "hf-generate-batch", "batch": batch, "skipped": note})
            continue
        rows.append(_throughput_row("hf-generate-batch", batch, got, seconds, noise))
    return rows


def throughput_ratios(rows: list[dict]) -> list[dict]:
    """Ours over each other engine's new tokens per second, per batch."""
    ours = {r["batch"]: r["tok_per_s"] for r in rows if r["engine"] == "ringserve"}
    return [
        {"batch": r["batch"], "versus": r["engine"], "ratio": ours[r["batch"]] / r["tok_per_s"]}
        for r in rows
        if r["engine"] != "ringserve" and "tok_per_s" in r and r["batch"] in ours
    ]
