"""The cuda backend through the model runner: its metadata, decode graphs, memory budget.

On a CPU, kernels_cuda.ops runs its torch references, so the cuda backend (and the decode
graphs, with an eager stand-in for capture) runs here too: these tests prove its metadata,
dispatch and static-buffer plumbing give the native backend's tokens. The slow emulated test
runs the CUDA kernels' own source on the CPU emulator through the whole model. The tests
marked `cuda` run on a GPU: our kernels and CUDA graphs against the native backend, and the
memory profile.
"""

from __future__ import annotations

import gc
import importlib.util
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_core.config import EngineConfig
from engine_core.models import loader as model_loader
from engine_core.protocol import CachedRequestData, NewRequestData, SamplingParams, SchedulerOutput
from engine_core.worker.cuda_graphs import (
    CudaGraphCapture,
    DecodeGraphs,
    capture_sizes,
    eager_capture,
)
from engine_core.worker.gpu_memory import kv_cache_blocks, profile_step_shape
from engine_core.worker.model_runner import ModelRunner
from engine_core.worker.staging import PinnedStaging
from kernels_cuda import launch, ops

# Logprobs come back from the raw logits: comparing them makes every step's numerics count.
GREEDY = SamplingParams(temperature=0.0, max_tokens=64, logprobs=1)
BLOCK = 16
GIB = 2**30
Outputs = dict[str, list[tuple[int, float]]]
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs an NVIDIA GPU (none found)"
)


# ------------------------------------------------------------------------------ a scheduler


@dataclass
class Req:
    prompt: list[int]
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    outputs: list[int] = field(default_factory=list)
    synced: int = -1  # tokens the runner holds; -1: never sent


class Driver:
    """Plays the scheduler: blocks from 1 up (block 0 stays unused), diffs, sampled tokens."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.free = list(range(runner.num_blocks - 1, 0, -1))
        self.reqs: dict[str, Req] = {}
        self.finished: list[str] = []
        self.sampled: Outputs = {}  # every request's (token, its logprob), dropped ones too

    def add(self, req_id: str, prompt: list[int], prefix_of: str | None = None) -> None:
        """A new request; prefix_of: it starts with that request's full blocks, cached."""
        req = Req(list(prompt))
        if prefix_of is not None:
            owner = self.reqs[prefix_of]
            shared = len(prompt) // BLOCK
            assert prompt[: shared * BLOCK] == owner.prompt[: shared * BLOCK]
            req.blocks, req.computed = owner.blocks[:shared], shared * BLOCK
        self.reqs[req_id] = req

    def drop(self, req_id: str) -> None:
        self.free.extend(reversed(self.reqs.pop(req_id).blocks))
        self.finished.append(req_id)

    def step(self, plan: dict[str, int]) -> None:
        new, cached = [], []
        for req_id, n in plan.items():
            req = self.reqs[req_id]
            need = -(-(req.computed + n) // BLOCK) - len(req.blocks)
            new_blocks = [self.free.pop() for _ in range(need)]
            req.blocks = req.blocks + new_blocks
            tokens = req.prompt + req.outputs
            if req.synced < 0:
                new.append(NewRequestData(req_id, req.prompt, [], GREEDY, req.blocks, req.computed))
            else:
                cached.append(
                    CachedRequestData(req_id, tokens[req.synced :], new_blocks, req.computed)
                )
            req.synced = len(tokens)
        so = SchedulerOutput(new, cached, plan, sum(plan.values()), self.finished)
        self.finished = []
        out = self.runner.execute_model(so)
        for req_id, n in plan.items():
            self.reqs[req_id].computed += n
        logprobs = out.logprobs or [None] * len(out.req_ids)
        for req_id, token, lp in zip(out.req_ids, out.sampled_token_ids, logprobs, strict=True):
            self.reqs[req_id].outputs.append(token)
            self.sampled.setdefault(req_id, []).append((token, lp.logprobs[0]))

    def decode(self, steps: int) -> None:
        for _ in range(steps):
            self.step({r: 1 for r in self.reqs})


def outputs_of_scenario(runner: ModelRunner, on_step=None) -> Outputs:
    """Chunked prefill, a cached prefix, mixed steps, then decode at 11, 9, 8, 3 and 1 rows:
    every request's (sampled token, its logprob). on_step(kind) runs after each step, kind
    "mixed" or "decode"."""
    d = Driver(runner)
    report = on_step or (lambda kind: None)
    long = list(range(30, 70))
    d.add("a", long)
    d.add("b", list(range(100, 107)))
    d.step({"a": 16, "b": 7})  # a's first chunk: not sampled
    report("mixed")
    d.step({"b": 1, "a": 24})  # a's last chunk over its cached first chunk, beside a decode
    report("mixed")
    d.add("c", long[:32] + [7, 8, 9, 10, 11], prefix_of="a")  # 32 tokens cached, a's blocks
    d.step({"a": 1, "b": 1, "c": 5})
    report("mixed")
    for i in range(8):
        d.add(f"d{i}", list(range(150 + 3 * i, 160 + 4 * i)))
    for _ in range(2):
        d.step({"a": 1, "b": 1, "c": 1})  # 3 rows
        report("decode")
    d.step({"a": 1, "b": 1, "c": 1} | {f"d{i}": 10 + i for i in range(8)})
    report("mixed")
    for kept in (11, 9, 8, 3, 1):
        for req_id in list(d.reqs)[: len(d.reqs) - kept]:
            d.drop(req_id)
        for _ in range(2):
            d.decode(1)
            report("decode")
    return d.sampled


def assert_same_outputs(ours: Outputs, ref: Outputs, atol: float) -> None:
    """Same requests, same greedy tokens, logprobs within atol."""
    assert sorted(ours) == sorted(ref)
    for req_id, expected in ref.items():
        assert [t for t, _ in ours[req_id]] == [t for t, _ in expected], req_id
        np.testing.assert_allclose(
            [lp for _, lp in ours[req_id]], [lp for _, lp in expected], atol=atol, rtol=0
        )


@pytest.fixture(scope="module")
def tiny_dir(make_tiny_llama) -> str:
    # Untied: with the LM head tied to the embedding, a random tiny model mostly repeats its
    # last token, and greedy tokens would say little.
    return make_tiny_llama("untied", tie_word_embeddings=False)


def tiny_runner(tiny_dir: str, config: dict | None = None, **kwargs) -> ModelRunner:
    defaults = {"dtype": "float32", "num_gpu_blocks_override": 64, "max_num_seqs": 12}
    runner = ModelRunner(EngineConfig(model=tiny_dir, **(defaults | (config or {}))), **kwargs)
    runner.warmup()
    return runner


class CountingCapture:
    """A capture (eager_capture by default) that counts replays per captured batch size."""

    def __init__(self, capture=eager_capture) -> None:
        self.capture = capture
        self.replays: Counter[int] = Counter()

    def __call__(self, fn):
        replay, out = self.capture(fn)
        size = out.shape[0]

        def counted():
            self.replays[size] += 1
            return replay()

        return counted, out


# ------------------------------------------------------------------------------ buckets


def test_capture_sizes_are_1_2_4_8_then_steps_of_8_up_to_max_num_seqs():
    assert capture_sizes(256) == [1, 2, 4, 8, *range(16, 257, 8)]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 24]  # the last holds 20 rows
    assert capture_sizes(3) == [1, 2, 4]
    assert capture_sizes(1) == [1]
    assert capture_sizes(4096)[-1] == 512
    with pytest.raises(AssertionError, match="max_num_seqs=0"):
        capture_sizes(0)


def test_a_decode_batch_runs_in_the_smallest_bucket_that_holds_it():
    graphs = DecodeGraphs(
        lambda ids, meta: ids, capture_sizes(256), 4, 64, torch.device("cpu"), eager_capture
    )
    buckets = {n: graphs.bucket(n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 250, 256, 257)}
    assert buckets == {
        1: 1, 2: 2, 3: 4, 5: 8, 8: 8, 9: 16, 16: 16, 17: 24, 250: 256, 256: 256, 257: None,
    }  # fmt: skip


# ------------------------------------------------------------------------------ metadata


def test_staging_moves_a_step_with_one_buffer_and_grows_when_needed():
    staging = PinnedStaging(64, "cpu")
    buffer = staging.device_buffer
    out = staging.stage(
        {
            "ids": (np.array([5, 6, 7]), torch.int64),
            "tables": (np.array([[1, 2], [3, 4]]), torch.int32),
            "none": (np.zeros(0, dtype=np.int64), torch.int32),
        }
    )
    assert out["ids"].tolist() == [5, 6, 7] and out["ids"].dtype == torch.int64
    assert out["tables"].tolist() == [[1, 2], [3, 4]] and out["tables"].dtype == torch.int32
    assert out["none"].shape == (0,)
    for t in out.values():  # views of the one device buffer, 16-byte aligned
        assert t.untyped_storage().data_ptr() == buffer.data_ptr()
        assert (t.data_ptr() - buffer.data_ptr()) % 16 == 0
    big = staging.stage({"ids": (np.arange(100), torch.int64)})
    assert big["ids"].tolist() == list(range(100)) and staging.capacity >= 800


# ------------------------------------------------------------------------------ the runner


def test_kernel_path_generates_the_cpu_paths_tokens(tiny_dir):
    cpu_runner = tiny_runner(tiny_dir)
    # On a CPU the runner keeps the native backend unless asked: no graphs.
    assert cpu_runner.attn_backend.name == "native"
    assert cpu_runner.cuda_graphs is None
    cpu = outputs_of_scenario(cpu_runner)
    kernels_runner = tiny_runner(tiny_dir, attention_backend="cuda")
    assert kernels_runner.cuda_graphs is None  # graphs need CUDA or a capture stand-in
    kernels = outputs_of_scenario(kernels_runner)
    assert len(cpu) == 11 and all(len(v) >= 7 for v in cpu.values())
    assert_same_outputs(kernels, cpu, atol=1e-4)


def test_decode_graphs_replay_the_eager_tokens_and_mixed_steps_do_not_replay(tiny_dir):
    capture = CountingCapture()
    graphs_runner = tiny_runner(tiny_dir, attention_backend="cuda", graph_capture=capture)
    assert graphs_runner.cuda_graphs.sizes == [1, 2, 4, 8, 16]
    assert graphs_runner.cuda_graphs.captured and not capture.replays
    replays_at: list[tuple[str, int]] = []

    def on_step(kind: str) -> None:
        replays_at.append((kind, sum(capture.replays.values())))

    with_graphs = outputs_of_scenario(graphs_runner, on_step)
    eager_runner = tiny_runner(
        tiny_dir,
        attention_backend="cuda",
        graph_capture=eager_capture,
        config={"enforce_eager": True},
    )
    assert eager_runner.cuda_graphs is None
    eager = outputs_of_scenario(eager_runner)
    assert_same_outputs(with_graphs, eager, atol=1e-4)
    # 3 rows -> bucket 4, 11 and 9 -> 16, 8 -> 8, 3 -> 4, 1 -> 1; two steps each.
    assert capture.replays == {4: 4, 16: 4, 8: 2, 1: 2}
    previous = 0
    for kind, total in replays_at:
        assert total == previous + (kind == "decode")
        previous = total
    # Padding rows wrote nothing: block 0 (no request's) is still zero, and every other
    # block holds what the eager runner wrote.
    assert not graphs_runner.kv_cache[:, :, 0].any()
    torch.testing.assert_close(graphs_runner.kv_cache, eager_runner.kv_cache, atol=1e-5, rtol=0)


def test_profile_step_fills_the_token_budget_over_the_allowed_rows():
    lens, table = profile_step_shape(2048, 256, 8192, 16)
    assert lens.tolist() == [8] * 256 and table.tolist() == [[i] for i in range(256)]
    lens, table = profile_step_shape(100, 8, 8192, 16)
    assert lens.tolist() == [13] * 4 + [12] * 4 and table[:, 0].tolist() == list(range(8))
    lens, table = profile_step_shape(2048, 1, 512, 16)  # no row past max_model_len
    assert lens.tolist() == [512] * 4 and table[3].tolist() == list(range(96, 128))


def test_profile_run_writes_exactly_the_profiled_tokens(tiny_dir):
    runner = tiny_runner(tiny_dir, attention_backend="cuda")
    query_lens, table = profile_step_shape(100, 12, runner.max_model_len, BLOCK)
    runner.profile_run(query_lens, table)
    written = runner.kv_cache.abs().sum(dim=(0, 1, 4, 5)).flatten() > 0
    assert written.nonzero().flatten().tolist() == [
        int(table[i, p // BLOCK]) * BLOCK + p % BLOCK
        for i, n in enumerate(query_lens)
        for p in range(n)
    ]


def test_gpu_memory_profile_logic_with_faked_cuda_memory_stats(tiny_dir, monkeypatch, caplog):
    """profile_num_blocks' sequence on the CPU, torch.cuda's memory counters faked."""
    runner = tiny_runner(tiny_dir, attention_backend="cuda", graph_capture=eager_capture)
    real_cache = runner.kv_cache
    peaks = iter([300 * 2**20, 100 * 2**20])  # the prefill profile, then the largest graph
    seen_caches = []

    def max_allocated(device):
        seen_caches.append(runner.kv_cache)
        return GIB + next(peaks)

    for name, fake in {
        "synchronize": lambda device=None: None,
        "reset_peak_memory_stats": lambda device=None: None,
        "empty_cache": lambda: None,
        "memory_allocated": lambda device=None: GIB,
        "max_memory_allocated": max_allocated,
        "mem_get_info": lambda device=None: (8 * GIB, 10 * GIB),
    }.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    block_bytes = 2**20
    with caplog.at_level("INFO", logger="engine_core.worker.gpu_memory"):
        blocks = runner._profile_num_blocks(block_bytes)
    # 10 GiB x 0.9 - 2 GiB in use - 300 MiB peak - (100 MiB graphs + 256 MiB margin)
    assert blocks == 9 * 1024 - 2048 - 300 - 100 - 256
    assert f"KV cache: {blocks} blocks = {blocks * BLOCK} tokens" in caplog.text
    # Both profiles ran on one scratch cache, not the real one, which is dropped after.
    assert len(seen_caches) == 2 and seen_caches[0] is seen_caches[1]
    assert seen_caches[0] is not real_cache and runner.kv_cache is None


def test_kv_cache_gets_what_utilization_leaves_after_the_profile():
    blocks = kv_cache_blocks(80 * GIB, 0.9, in_use=10 * GIB, activations=2 * GIB,
                             reserve=GIB, block_bytes=2 * 2**20)  # fmt: skip
    assert blocks == (72 - 13) * 512
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0.1 .*fewer than 2 blocks"):
        kv_cache_blocks(80 * GIB, 0.1, 7 * GIB, GIB, GIB, 2 * 2**20)


# ------------------------------------------------------------------------------ emulated GPU


def _load_emulator():
    path = Path(__file__).resolve().parents[2] / "kernels_cuda" / "kernel_emulator.py"
    spec = importlib.util.spec_from_file_location("kernel_emulator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cuda_kernels_emulated_through_the_model_give_the_reference_ops_tokens(
    tiny_dir, monkeypatch, tmp_path
):
    """The kernels' CUDA source (g++ emulator) through bf16 model, runner and decode graphs."""
    emulator_module = _load_emulator()
    if not emulator_module.compiler_available():
        pytest.skip("g++ is needed to emulate the CUDA kernels on the CPU")
    # bf16 storage and math on the CPU, as on a GPU (the CUDA kernels take fp16/bf16 only).
    monkeypatch.setattr(
        model_loader, "resolve_dtypes", lambda dtype, cfg, device: (torch.bfloat16,) * 2
    )
    config = {"dtype": "bfloat16", "max_model_len": 256}
    reference = outputs_of_scenario(
        tiny_runner(tiny_dir, attention_backend="cuda", config=config | {"enforce_eager": True})
    )
    emulator = emulator_module.Emulator(tmp_path)
    monkeypatch.setattr(ops, "_use_cuda", lambda t: True)
    monkeypatch.setattr(launch, "kernel", emulator.kernel)
    monkeypatch.setattr(launch, "stream", lambda device: 0)
    monkeypatch.setattr(launch, "sm_count", lambda device: 4)  # decode splits at 256 tokens
    capture = CountingCapture()
    runner = tiny_runner(tiny_dir, attention_backend="cuda", graph_capture=capture, config=config)
    emulated = outputs_of_scenario(runner)
    launched = {k.name for k in emulator.kernels}
    assert {"reshape_and_cache", "paged_attention_prefill", "paged_attention_decode_g2",
            "paged_attention_decode_reduce", "rms_norm", "rotary_embedding_neox",
            "silu_and_mul"} <= launched  # fmt: skip
    assert sum(capture.replays.values()) == 12
    assert_same_outputs(emulated, reference, atol=0.02)  # measured: 2e-3


# ------------------------------------------------------------------------------ on a GPU


GPU_PROMPTS = [
    "The three primary colors are",
    "def fibonacci(n):\n    ",
    "Write a haiku about the sea. The waves roll in slowly, and the gulls cry out above",
    "Paris is the capital of",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the mountains,",
]


def _gpu_greedy(smollm2_tokenizer, config: dict | None = None, **kwargs) -> dict[str, list[int]]:
    defaults = {"dtype": "bfloat16", "max_num_seqs": 16, "num_gpu_blocks_override": 1024}
    runner = ModelRunner(EngineConfig(device="cuda", **(defaults | (config or {}))), **kwargs)
    runner.warmup()
    d = Driver(runner)
    for i, p in enumerate(GPU_PROMPTS):
        d.add(f"p{i}", smollm2_tokenizer.encode(p))
    long = d.reqs["p2"].prompt
    d.step({f"p{i}": len(d.reqs[f"p{i}"].prompt) for i in (0, 1, 3)} | {"p2": 8})
    d.step({"p0": 1, "p1": 1, "p3": 1, "p2": len(long) - 8, "p4": len(d.reqs["p4"].prompt)})
    d.step({f"p{i}": 1 for i in range(5)} | {"p5": len(d.reqs["p5"].prompt)})
    d.decode(24)
    result = {r: req.outputs for r, req in d.reqs.items()}
    del runner, d
    gc.collect()
    torch.cuda.empty_cache()
    return result


def _assert_bf16_greedy_agree(ours: dict[str, list[int]], ref: dict[str, list[int]]) -> None:
    for req_id, tokens in ref.items():
        assert ours[req_id][:16] == tokens[:16], (req_id, ours[req_id], tokens)
    same = sum(ours[r] == ref[r] for r in ref)
    assert same >= len(ref) / 2, (ours, ref)


@pytest.mark.cuda
@needs_gpu
def test_gpu_kernels_generate_the_torch_paths_greedy_tokens(smollm2_tokenizer):
    torch_path = _gpu_greedy(smollm2_tokenizer, attention_backend="native")
    kernels = _gpu_greedy(smollm2_tokenizer)  # kernels and CUDA graphs: the default on CUDA
    _assert_bf16_greedy_agree(kernels, torch_path)


@pytest.mark.cuda
@needs_gpu
def test_gpu_cuda_graphs_generate_the_eager_tokens(smollm2_tokenizer):
    eager = _gpu_greedy(smollm2_tokenizer, config={"enforce_eager": True})
    capture = CountingCapture(CudaGraphCapture())
    graphs = _gpu_greedy(smollm2_tokenizer, graph_capture=capture)
    assert capture.replays == {8: 24}  # 24 decode steps of 6 rows, in the graph of 8
    _assert_bf16_greedy_agree(graphs, eager)


@pytest.mark.cuda
@needs_gpu
def test_gpu_memory_profile_sizes_the_kv_cache_within_utilization():
    gc.collect()
    torch.cuda.empty_cache()
    config = EngineConfig(device="cuda", dtype="bfloat16", gpu_memory_utilization=0.5)
    runner = ModelRunner(config)
    assert runner.cuda_graphs is not None and runner.num_blocks >= 2
    runner.warmup()  # captures the graphs, after the KV cache
    free, total = torch.cuda.mem_get_info()
    kv_bytes = runner.kv_cache.numel() * runner.kv_cache.element_size()
    assert kv_bytes > 0.2 * total  # SmolLM2 leaves most of the half to the KV cache
    assert total - free <= 0.5 * total + 2**29  # within the budget, give or take 512 MiB
