"""Tensor parallelism on CPU (gloo): N worker processes produce what one process produces.

The sharded runs go through the real MultiprocExecutor, worker processes and MessageQueues,
driven by an EngineCore in this process (or by LLM, with its EngineCore process, end to end).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from engine_core.config import EngineConfig
from engine_core.core import EngineCore
from engine_core.executor.multiproc import WorkerStartupError
from engine_core.models.gguf_file import GGUFFile
from engine_core.models.llama import hf_weight_shapes, tensor_parallel_shape
from engine_core.models.loader import GGUFWeights, load_model_config
from engine_core.models.model_config import ModelConfig
from engine_core.protocol import EngineCoreRequest, SamplingParams
from tests.procs import child_pids, pid_alive

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, seed=7, max_tokens=24, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 60)), [3] * 20, [200, 100, 50]]

# 8 heads over 4 KV heads; a vocabulary of 255 rows pads to 256 for two ranks.
TP_LLAMA = dict(
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=255,
    tie_word_embeddings=False,
    initializer_range=0.1,  # peaked logits: greedy choices far from ties
)


def run_core(config: EngineConfig, prompts, params) -> tuple[list[list[int]], list[int]]:
    """Generate with an EngineCore in this process: (tokens per prompt, weight bytes per rank)."""
    core = EngineCore(config)
    try:
        weights = list(core.executor.weight_bytes)
        for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
            core.add_request(EngineCoreRequest(str(i), prompt, sp))
        tokens: list[list[int]] = [[] for _ in prompts]
        while core.has_work():
            for out in core.step().outputs:
                assert out.error is None, out.error
                tokens[int(out.request_id)] += out.new_token_ids
        return tokens, weights
    finally:
        core.shutdown()


def tiny_config(path: str, tp: int, **kw) -> EngineConfig:
    return EngineConfig(
        model=path, dtype="float32", tensor_parallel_size=tp, kv_cache_space_gib=0.02, **kw
    )


def worker_pids(core_pid: int) -> list[int]:
    """The TP worker processes among core_pid's children, by rank."""
    found = {}
    for pid in child_pids(core_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as c:
                argv = c.read().split(b"\0")
        except OSError:
            continue
        if b"engine_core.worker" in argv:
            found[int(argv[argv.index(b"--rank") + 1])] = pid
    return [found[r] for r in sorted(found)]


# ------------------------------------------------------------------------------ sharding rules


def test_heads_split_over_ranks_and_kv_heads_replicate_when_fewer():
    cfg = ModelConfig(
        vocab_size=10, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=8,
        num_kv_heads=2, head_dim=8,
    )  # fmt: skip
    two = [tensor_parallel_shape(cfg, r, 2) for r in range(2)]
    assert [(s.num_heads, s.num_kv_heads, s.kv_head_start) for s in two] == [(4, 1, 0), (4, 1, 1)]
    four = [tensor_parallel_shape(cfg, r, 4) for r in range(4)]
    # Rank r holds query heads 2r, 2r+1: KV group (2r) // 4, which it replicates.
    assert [(s.num_heads, s.num_kv_heads, s.kv_head_start) for s in four] == [
        (2, 1, 0), (2, 1, 0), (2, 1, 1), (2, 1, 1)
    ]  # fmt: skip
    assert [(s.vocab_start, s.vocab_rows) for s in four] == [(0, 3), (3, 3), (6, 3), (9, 3)]
    assert four[0].intermediate_size == 24


@pytest.mark.parametrize(
    ("heads", "kv_heads", "tp", "message"),
    [
        (9, 3, 2, "must divide the number of attention heads: the model has 9 attention heads "
                  "and 3 KV heads"),
        (12, 4, 3, "must divide the number of KV heads"),
        (12, 4, 6, "must be a multiple of the number of KV heads"),
        (8, 8, 16, "must divide the number of attention heads"),
    ],
)  # fmt: skip
def test_a_model_that_cannot_split_is_refused_naming_its_head_counts(heads, kv_heads, tp, message):
    cfg = ModelConfig(
        vocab_size=10, hidden_size=heads * 8, intermediate_size=96, num_layers=1,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=8,
    )  # fmt: skip
    with pytest.raises(ValueError, match=message):
        tensor_parallel_shape(cfg, 0, tp)


def test_gguf_shards_are_the_slices_of_the_whole_tensors():
    # Each rank dequantizes only its rows or column blocks of the Q4_1 GGUF: same values.
    config, files = load_model_config(EngineConfig())
    source = GGUFWeights(GGUFFile(files.gguf_path), config)
    shapes = hf_weight_shapes(config)
    names = ["model.embed_tokens.weight"] + [
        f"model.layers.0.{n}.weight"
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.down_proj")
    ]
    for name in names:
        whole = source.get(name, shapes[name], None)
        dim = 1 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0
        step = shapes[name][dim] // 3
        for rank in range(3):
            shard = (dim, rank * step, (rank + 1) * step)
            got = source.get(name, shapes[name], shard)
            assert torch.equal(got, whole.narrow(dim, rank * step, step)), (name, rank)


# ------------------------------------------------------------------------------ two ranks


@pytest.fixture(scope="module")
def tp_llama(make_tiny_llama) -> str:
    return make_tiny_llama("tp_llama", **TP_LLAMA)


@pytest.fixture(scope="module")
def one_and_two_ranks(tp_llama):
    params = [GREEDY, GREEDY, GREEDY, SEEDED]
    one = run_core(tiny_config(tp_llama, 1), PROMPTS, params)
    two = run_core(tiny_config(tp_llama, 2), PROMPTS, params)
    return one, two


@pytest.mark.slow
def test_two_ranks_generate_what_one_generates(one_and_two_ranks):
    (one, _), (two, _) = one_and_two_ranks
    assert all(len(t) == 24 for t in one)
    assert two == one


@pytest.mark.slow
def test_each_of_two_ranks_holds_half_the_weights(one_and_two_ranks):
    (_, (whole,)), (_, per_rank) = one_and_two_ranks
    assert len(per_rank) == 2
    # Every weight is sharded but the norms (4 * 2 + 1 vectors of 64 floats, replicated) and
    # the vocabulary's padding row (64 floats in the embedding and in the LM head).
    replicated = (4 * 2 + 1) * 64 * 4
    for rank_bytes in per_rank:
        assert abs(rank_bytes - whole / 2) <= replicated + 2 * 64 * 4, (rank_bytes, whole)
    assert max(per_rank) < 0.52 * whole


@pytest.mark.slow
def test_fewer_kv_heads_than_ranks_are_replicated(make_tiny_llama):
    # One KV head (multi-query attention): both ranks keep it, each with half the query heads.
    path = make_tiny_llama("tp_mqa", **{**TP_LLAMA, "num_key_value_heads": 1})
    params = [GREEDY] * 3
    one, _ = run_core(tiny_config(path, 1), PROMPTS[:3], params)
    two, _ = run_core(tiny_config(path, 2), PROMPTS[:3], params)
    assert two == one


@pytest.mark.slow
def test_a_worker_that_cannot_start_fails_start_up_with_its_error(make_tiny_llama):
    odd = {"num_attention_heads": 3, "num_key_value_heads": 1, "hidden_size": 48}
    path = make_tiny_llama("tp_odd_heads", **{**TP_LLAMA, **odd})
    shm_before = set(os.listdir("/dev/shm"))
    t0 = time.monotonic()
    with pytest.raises(WorkerStartupError) as info:
        EngineCore(tiny_config(path, 2))
    assert time.monotonic() - t0 < 30
    assert "failed to start" in str(info.value)
    assert "the model has 3 attention heads and 1 KV heads" in str(info.value)
    assert set(os.listdir("/dev/shm")) - shm_before == set()
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _is_worker_of(int(p))]


def _is_worker_of(pid: int) -> bool:
    """A TP worker process started from this test process."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return (
        b"engine_core.worker" in argv
        and argv[argv.index(b"--parent-pid") + 1] == str(os.getpid()).encode()
        and pid_alive(pid)
    )


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tp_chat_llama(make_tiny_llama) -> str:
    """A tiny Llama with SmolLM2's vocabulary and tokenizer, for LLM()."""
    from frontend.tokenizer import load_tokenizer

    path = make_tiny_llama(
        "tp_chat", **{**TP_LLAMA, "vocab_size": 49152, "max_position_embeddings": 4096}
    )
    load_tokenizer(None).save_pretrained(path)
    return path


@pytest.mark.slow
def test_killing_a_worker_fails_generation_and_leaves_nothing_behind(tp_chat_llama):
    from frontend import LLM
    from frontend.core_client import EngineDeadError

    shm_before = set(os.listdir("/dev/shm"))
    llm = LLM(model=tp_chat_llama, dtype="float32", tensor_parallel_size=2, kv_cache_space_gib=0.05)
    try:
        core_pid = llm.engine.proc.pid
        workers = worker_pids(core_pid)
        assert len(workers) == 2
        # Sharded end to end: a short greedy generation works before the fault.
        ok = llm.generate(
            [[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False
        )
        assert len(ok[0].outputs[0].token_ids) == 4

        result: dict[str, object] = {}

        def generate() -> None:
            long = SamplingParams(temperature=0.0, max_tokens=1500, ignore_eos=True)
            try:
                result["outputs"] = llm.generate([[5, 6, 7]] * 4, long, use_tqdm=False)
            except Exception as e:  # noqa: BLE001 - the test inspects it
                result["error"] = e

        thread = threading.Thread(target=generate)
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive(), f"generation ended before the kill: {result}"
        killed_at = time.monotonic()
        os.kill(workers[1], signal.SIGKILL)
        thread.join(10.0)
        took = time.monotonic() - killed_at
        assert not thread.is_alive(), "generate() still running 10 s after the kill"
        error = result.get("error")
        assert isinstance(error, EngineDeadError), result
        assert "rank 1" in str(error) and "SIGKILL" in str(error), str(error)
        llm.close()
        took_all = time.monotonic() - killed_at
        assert took < 5.0 and took_all < 10.0, (took, took_all)
    finally:
        llm.close()
    assert not pid_alive(core_pid) and not any(pid_alive(p) for p in workers)
    assert set(os.listdir("/dev/shm")) - shm_before == set()


@pytest.mark.slow
def test_three_ranks_of_the_default_model_generate_what_one_generates():
    from frontend import LLM

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    sharded_config = dict(dtype="float32", kv_cache_space_gib=0.05, max_model_len=512)
    with LLM(tensor_parallel_size=3, **sharded_config) as llm:
        sharded = llm.generate(prompts, params, use_tqdm=False)
        prompt_ids = [o.prompt_token_ids for o in sharded]
        core_pid = llm.engine.proc.pid
        assert len(worker_pids(core_pid)) == 3
    whole, _ = run_core(
        EngineConfig(**sharded_config),
        prompt_ids,
        [params] * len(prompts),
    )
    assert [list(o.outputs[0].token_ids) for o in sharded] == whole
