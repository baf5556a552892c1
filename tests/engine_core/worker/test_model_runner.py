"""ModelRunner driven by hand-built SchedulerOutputs, checked against transformers' greedy."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from engine_core.config import EngineConfig
from engine_core.protocol import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SamplingParams,
    SchedulerOutput,
)
from engine_core.worker.model_runner import ModelRunner

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


@dataclass
class Req:
    prompt: list[int]
    params: SamplingParams
    outputs: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    synced: int = -1  # tokens the runner holds; -1: never sent

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.outputs


class Driver:
    """Plays the scheduler's part: block allocation, diffs, and feeding sampled tokens back."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.free = list(range(runner.num_blocks - 1, -1, -1))
        self.reqs: dict[str, Req] = {}
        self.finished: list[str] = []
        self.preempted: list[str] = []

    def add(self, req_id: str, prompt: list[int], params: SamplingParams = GREEDY) -> None:
        self.reqs[req_id] = Req(list(prompt), params)

    def drop(self, req_id: str, preempt: bool = False) -> None:
        """Finish (or preempt: back to 'never sent', KV cache freed) a request."""
        req = self.reqs[req_id] if preempt else self.reqs.pop(req_id)
        self.free.extend(reversed(req.blocks))
        req.blocks, req.computed, req.synced = [], 0, -1
        (self.preempted if preempt else self.finished).append(req_id)

    def step(self, plan: dict[str, int]) -> ModelRunnerOutput:
        bs = self.runner.block_size
        new, cached = [], []
        for req_id, n in plan.items():
            req = self.reqs[req_id]
            need = -(-(req.computed + n) // bs) - len(req.blocks)
            new_blocks = [self.free.pop() for _ in range(need)]
            req.blocks += new_blocks
            if req.synced < 0:
                new.append(
                    NewRequestData(
                        req_id, req.prompt, req.outputs, req.params, req.blocks, req.computed
                    )
                )
            else:
                cached.append(
                    CachedRequestData(req_id, req.tokens[req.synced :], new_blocks, req.computed)
                )
            req.synced = len(req.tokens)
        so = SchedulerOutput(new, cached, plan, sum(plan.values()), self.finished, self.preempted)
        self.finished, self.preempted = [], []
        out = self.runner.execute_model(so)
        expected = {
            r for r, n in plan.items() if self.reqs[r].computed + n == len(self.reqs[r].tokens)
        }
        assert set(out.req_ids) == expected  # sampled iff caught up
        for req_id, n in plan.items():
            self.reqs[req_id].computed += n
        for req_id, token in zip(out.req_ids, out.sampled_token_ids, strict=True):
            self.reqs[req_id].outputs.append(token)
        return out


@pytest.fixture(scope="module")
def runner():
    r = ModelRunner(EngineConfig(dtype="float32", kv_cache_space_gib=0.1, max_num_seqs=8))
    r.warmup()
    return r


def assert_greedy_like_transformers(hf_model, prompt: list[int], ours: list[int]) -> None:
    """Our greedy tokens equal generate()'s; generate may stop early, at an EOS we also chose."""
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=len(ours), do_sample=False, pad_token_id=0
        )
    ref = out[0, len(prompt) :].tolist()
    assert ours[: len(ref)] == ref
    assert len(ref) == len(ours) or ref[-1] == hf_model.generation_config.eos_token_id


@pytest.mark.slow
def test_mixed_steps_generate_what_transformers_generates(runner, hf_smollm2, smollm2_tokenizer):
    enc = smollm2_tokenizer.encode
    a = enc("The three primary colors are")
    b = enc("Write a haiku about the sea. The waves roll in slowly, and the gulls cry out")
    c = enc("Paris is the capital of")
    assert len(b) > 16
    d = Driver(runner)
    d.add("a", a)
    d.add("b", b)
    d.step({"a": len(a), "b": 16})  # b's first chunk: not sampled
    d.step({"a": 1, "b": len(b) - 16})  # a decodes beside b's last chunk
    for _ in range(3):
        d.step({"a": 1, "b": 1})
    d.add("c", c)  # joins mid-flight
    d.step({"a": 1, "b": 1, "c": len(c)})
    a_out = list(d.reqs["a"].outputs)
    d.drop("a")
    d.drop("b", preempt=True)  # b comes back with its outputs, recomputed from scratch
    d.step({"c": 1})
    b_tokens = d.reqs["b"].tokens
    d.step({"c": 1, "b": len(b_tokens)})
    for _ in range(6):
        d.step({"b": 1, "c": 1})
    assert_greedy_like_transformers(hf_smollm2, a, a_out)
    for req_id, prompt in (("b", b), ("c", c)):
        assert len(d.reqs[req_id].outputs) >= 8
        assert_greedy_like_transformers(hf_smollm2, prompt, d.reqs[req_id].outputs)


@pytest.mark.slow
def test_seeded_sampling_does_not_depend_on_the_batch(runner):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=8)
    prompt = list(range(100, 130))
    alone = Driver(runner)
    alone.add("x", prompt, seeded)
    alone.step({"x": len(prompt)})
    for _ in range(7):
        alone.step({"x": 1})
    alone_outputs = alone.reqs["x"].outputs
    alone.drop("x")
    alone.step({})
    crowd = Driver(runner)
    crowd.add("x2", prompt, seeded)
    crowd.add("y", list(range(200, 220)), SamplingParams(temperature=1.0, max_tokens=8))
    crowd.add("z", list(range(300, 310)), SamplingParams(temperature=0.7, seed=7, max_tokens=8))
    crowd.step({"y": 20, "x2": len(prompt), "z": 10})
    for _ in range(7):
        crowd.step({"z": 1, "x2": 1, "y": 1})
    assert crowd.reqs["x2"].outputs == alone_outputs
    for req_id in list(crowd.reqs):
        crowd.drop(req_id)
    crowd.step({})


@pytest.mark.slow
def test_logprobs_come_back_only_for_requests_that_ask(runner, hf_smollm2):
    d = Driver(runner)
    prompt = list(range(50, 70))
    d.add("lp", prompt, SamplingParams(temperature=0.0, logprobs=3))
    d.add("plain", list(range(80, 90)))
    out = d.step({"lp": len(prompt), "plain": 10})
    by_id = dict(zip(out.req_ids, out.logprobs, strict=True))
    assert by_id["plain"] is None
    lp = by_id["lp"]
    assert len(lp.token_ids) == 4 and lp.token_ids[0] == d.reqs["lp"].outputs[0]
    with torch.inference_mode():
        ref = torch.log_softmax(hf_smollm2(torch.tensor([prompt])).logits[0, -1], -1)
    for token_id, value in zip(lp.token_ids, lp.logprobs, strict=True):
        assert abs(value - ref[token_id].item()) < 1e-3
    d.drop("lp")
    d.drop("plain")
    d.step({})


# ------------------------------------------------------------------------------ tiny model


@pytest.fixture(scope="module")
def tiny_dir(make_tiny_llama) -> str:
    return make_tiny_llama("plain-tied")


def test_kv_cache_is_sized_from_the_config(tiny_dir):
    r = ModelRunner(EngineConfig(model=tiny_dir, dtype="float32", kv_cache_space_gib=0.01))
    cfg = r.model_config
    block_bytes = 2 * cfg.num_layers * 16 * cfg.num_kv_heads * cfg.head_dim * 4
    assert r.num_blocks == int(0.01 * 2**30) // block_bytes
    assert r.kv_cache.shape == (cfg.num_layers, 2, r.num_blocks, 16, cfg.num_kv_heads, cfg.head_dim)
    assert r.max_model_len == cfg.max_position_embeddings == 512
    r = ModelRunner(EngineConfig(model=tiny_dir, num_gpu_blocks_override=7, max_model_len=100))
    assert r.num_blocks == 7 and r.max_model_len == 100


def test_max_model_len_beyond_the_model_context_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="max_model_len=1000"):
        ModelRunner(EngineConfig(model=tiny_dir, max_model_len=1000))


def test_bad_scheduler_outputs_are_refused_by_name(tiny_dir):
    r = ModelRunner(EngineConfig(model=tiny_dir, dtype="float32", num_gpu_blocks_override=8))
    new = NewRequestData("r1", [5, 6, 7], [], GREEDY, [0], 0)
    with pytest.raises(ValueError, match="'ghost'"):
        r.execute_model(SchedulerOutput([], [CachedRequestData("ghost", [], [], 0)], {}, 0))
    with pytest.raises(AssertionError, match="scheduled past a request's tokens"):
        r.execute_model(SchedulerOutput([new], [], {"r1": 4}, 4))
    bad_block = NewRequestData("r2", [5, 6, 7], [], GREEDY, [8], 0)
    with pytest.raises(ValueError, match="block id 8"):
        r.execute_model(SchedulerOutput([bad_block], [], {"r2": 3}, 3))
    short = NewRequestData("r3", list(range(40)), [], GREEDY, [1], 0)
    with pytest.raises(AssertionError, match="short of KV blocks"):
        r.execute_model(SchedulerOutput([short], [], {"r3": 40}, 40))


def test_tiny_model_runner_matches_transformers_greedy(tiny_dir):
    from transformers import AutoModelForCausalLM

    r = ModelRunner(EngineConfig(model=tiny_dir, dtype="float32", num_gpu_blocks_override=64))
    r.warmup()
    assert len(r.input_batch) == 0
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    prompts = {f"r{i}": list(range(10 + i, 10 + i + 5 * (i + 1))) for i in range(10)}
    d = Driver(r)
    for req_id, p in prompts.items():
        d.add(req_id, p)
    d.step({req_id: len(p) for req_id, p in prompts.items()})
    for _ in range(12):  # ten decode rows: more than one decode group
        d.step({req_id: 1 for req_id in prompts})
    for req_id, p in prompts.items():
        assert len(d.reqs[req_id].outputs) == 13
        assert_greedy_like_transformers(ref_model, p, d.reqs[req_id].outputs)
