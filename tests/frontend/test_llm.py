"""The offline LLM API end to end: greedy tokens equal Hugging Face transformers'."""

from __future__ import annotations

import os

import pytest

from engine_core.protocol import SamplingParams

pytestmark = pytest.mark.slow

NEW_TOKENS = 24
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away, there lived a dragon who loved to read books. "
    "Every evening, the dragon would",
    # A long one, over several blocks and longer than a 64-token chunk.
    "In the beginning of the history of computing, machines were large and slow. "
    + "Engineers worked day and night to make them smaller, faster and cheaper. " * 12
    + "Today, the most important lesson from that era is",
    "1, 2, 3, 4, 5,",
]


def _hf_greedy(model, token_ids: list[int], n: int) -> list[int]:
    import torch

    with torch.inference_mode():
        out = model(torch.tensor([token_ids]), use_cache=True)
        past, tokens = out.past_key_values, []
        for _ in range(n):
            nxt = int(out.logits[0, -1].argmax())
            tokens.append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
    return tokens


@pytest.fixture(scope="module")
def tokenizer():
    from frontend.tokenizer import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="module")
def reference(tokenizer) -> list[list[int]]:
    """HF transformers' greedy continuation of each prompt, fp32, EOS not stopping it."""
    from tools.hf_reference import load_hf_model

    model = load_hf_model(None, "float32")
    refs = [_hf_greedy(model, tokenizer.encode(p), NEW_TOKENS) for p in PROMPTS]
    del model
    return refs


def _greedy():
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def assert_matches(outputs, reference) -> None:
    """All share their first 16 tokens; at most one prompt may diverge later (a near-tie)."""
    late = 0
    for out, ref in zip(outputs, reference, strict=True):
        got = out.outputs[0].token_ids
        assert len(got) == len(ref), (out.prompt, got, ref)
        assert got[:16] == ref[:16], (out.prompt, got, ref)
        late += got != ref
    assert late <= 1, f"{late} prompts diverged after token 16"


def assert_all_blocks_free(llm) -> None:
    stats = llm.get_stats()
    assert stats.num_running_reqs == 0 and stats.num_waiting_reqs == 0
    assert stats.num_free_blocks == stats.num_usable_blocks, stats


@pytest.fixture(scope="module")
def llm():
    from frontend import LLM

    with LLM(dtype="float32") as llm:
        yield llm


def test_batch_greedy_equals_transformers(llm, reference):
    outs = llm.generate(PROMPTS, _greedy(), use_tqdm=False)
    assert [o.prompt for o in outs] == PROMPTS
    assert_matches(outs, reference)
    for o in outs:
        assert o.finished and o.outputs[0].finish_reason == "length"
        assert o.outputs[0].text == llm.tokenizer.decode(
            o.outputs[0].token_ids, skip_special_tokens=True
        )
    assert_all_blocks_free(llm)


def test_token_id_prompts_and_warm_prefix_cache(llm, reference, tokenizer):
    prompts = [{"prompt_token_ids": tokenizer.encode(p)} for p in PROMPTS]
    first = llm.generate(prompts, _greedy(), use_tqdm=False)
    assert_matches(first, reference)
    # The second pass finds the prompts' full blocks in the prefix cache.
    second = llm.generate(prompts, _greedy(), use_tqdm=False)
    assert_matches(second, reference)
    long_prompt = second[4]
    assert (
        long_prompt.num_cached_tokens >= 16 * ((len(long_prompt.prompt_token_ids) - 1) // 16) - 16
    )
    assert long_prompt.num_cached_tokens > 0
    assert_all_blocks_free(llm)


def test_chunked_prefill_with_small_budget_equals_transformers(reference):
    from frontend import LLM

    with LLM(dtype="float32", max_num_batched_tokens=64, enable_prefix_caching=False) as llm:
        outs = llm.generate(PROMPTS, _greedy(), use_tqdm=False)
        assert_matches(outs, reference)
        assert_all_blocks_free(llm)


def test_preemption_with_tiny_kv_pool_equals_transformers(reference, tokenizer):
    from frontend import LLM

    # The longest prompt needs ~12 blocks with its output; 24 blocks cannot hold all six.
    longest = max(len(tokenizer.encode(p)) for p in PROMPTS) + NEW_TOKENS
    assert longest <= 24 * 16
    with LLM(dtype="float32", num_gpu_blocks_override=24, block_size=16) as llm:
        outs = llm.generate(PROMPTS, _greedy(), use_tqdm=False)
        assert_matches(outs, reference)
        assert_all_blocks_free(llm)


def test_bad_input_raises_and_engine_keeps_working(llm):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="context"):
        llm.generate("hello", SamplingParams(max_tokens=llm.max_model_len + 1), use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate({"prompt_token_ids": [10**9]}, SamplingParams(max_tokens=2), use_tqdm=False)
    out = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) >= 1
    assert_all_blocks_free(llm)


def test_sampling_n_seed_stop_and_logprobs(llm):
    sp = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, logprobs=2, ignore_eos=True)
    a = llm.generate("Tell me a story", sp, use_tqdm=False)[0]
    b = llm.generate("Tell me a story", sp, use_tqdm=False)[0]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    for c in a.outputs:
        assert len(c.logprobs) == len(c.token_ids)
        for tok, lp in zip(c.token_ids, c.logprobs, strict=True):
            assert tok in lp and lp[tok].logprob <= 0.0
    stop = llm.generate(
        "1, 2, 3, 4, 5,",
        SamplingParams(temperature=0.0, max_tokens=30, stop=["8"], ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert stop.finish_reason == "stop" and stop.stop_reason == "8" and "8" not in stop.text
    assert_all_blocks_free(llm)


def test_close_leaves_no_process_or_shared_memory():
    from frontend import LLM

    before = set(os.listdir("/dev/shm"))
    llm = LLM(dtype="float32", num_gpu_blocks_override=64)
    pid = llm.engine.proc.pid
    llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)
    llm.close()
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert set(os.listdir("/dev/shm")) - before == set()


def test_killed_engine_core_raises_instead_of_hanging():
    import signal
    import threading
    import time

    from frontend import LLM
    from frontend.core_client import EngineDeadError

    before = set(os.listdir("/dev/shm"))
    llm = LLM(dtype="float32", num_gpu_blocks_override=64)
    pid = llm.engine.proc.pid
    threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match="SIGKILL"):
        llm.generate(["Count to a thousand:"] * 4, SamplingParams(max_tokens=2000, ignore_eos=True))
    assert time.monotonic() - start < 15
    with pytest.raises(EngineDeadError):  # later calls fail at once too
        llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)
    llm.close()
    assert set(os.listdir("/dev/shm")) - before == set()
