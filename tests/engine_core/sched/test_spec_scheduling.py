"""The scheduler with drafts: verified runs, rolled-back rejections and the blocks they leave.

A fake runner mirrors the model runner's block tables (dropped trailing blocks included) and
simulates the KV cache slot by slot, as test_scheduler.py's does, with drafts: a step writes
the K/V of the request's tokens and its drafts, accepts drafts while they equal the token the
request samples there (greedy), and checks that every position attended to holds the K/V of
the right prefix. Outputs must be the outputs without speculation, and after every step a
request holds exactly the blocks its computed tokens need.
"""

from __future__ import annotations

import random
import zlib

import pytest

from engine_core.config import EngineConfig
from engine_core.protocol import ModelRunnerOutput, SamplingParams, SchedulerOutput
from engine_core.sched.request import Request, RequestStatus
from engine_core.sched.scheduler import Scheduler
from tests.engine_core.sched.test_scheduler import prefix_values

BLOCK = 4


def token_at(req_id: str, position: int) -> int:
    """The token a request samples at a position (greedy): ids 10..999, never EOS."""
    return 10 + zlib.crc32(f"{req_id}:{position}".encode()) % 990


class SpecRunner:
    """Mirrors the runner's rows from SchedulerOutputs; verifies drafts as a greedy target."""

    def __init__(self) -> None:
        self.reqs: dict[str, dict] = {}
        self.slots: dict[tuple[int, int], int] = {}
        self.num_dropped = 0

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in (*out.finished_req_ids, *out.preempted_req_ids):
            self.reqs.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            tokens = new.prompt_token_ids + new.output_token_ids
            self.reqs[new.req_id] = dict(
                tokens=tokens, computed=new.num_computed_tokens, blocks=list(new.block_ids)
            )
        for cached in out.scheduled_cached_reqs:
            state = self.reqs[cached.req_id]
            assert cached.num_computed_tokens == state["computed"]
            state["tokens"] += cached.new_token_ids
            if cached.num_dropped_blocks:
                assert cached.num_dropped_blocks <= len(state["blocks"])
                del state["blocks"][-cached.num_dropped_blocks :]
                self.num_dropped += cached.num_dropped_blocks
            state["blocks"] += cached.new_block_ids
        req_ids, sampled, emitted = [], [], []
        for req_id, n in out.num_scheduled_tokens.items():
            state = self.reqs[req_id]
            drafts = out.scheduled_spec_decode_tokens.get(req_id, [])
            seq = state["tokens"] + drafts
            start, end = state["computed"], state["computed"] + n
            assert end == len(seq) or not drafts
            assert len(state["blocks"]) * BLOCK >= end, f"{req_id}: slots past its blocks"
            values = prefix_values(seq[:end])
            for pos in range(start, end):
                self.slots[self.slot(state, pos)] = values[pos]
            for pos in range(end):
                assert self.slots.get(self.slot(state, pos)) == values[pos], (
                    f"{req_id} reads wrong K/V at position {pos}"
                )
            if end < len(state["tokens"]):  # a partial prefill
                state["computed"] = end
                continue
            first = len(state["tokens"])
            run = []
            for j, d in enumerate(drafts):
                target = token_at(req_id, first + j)
                run.append(target)
                if d != target:
                    break
            else:
                run.append(token_at(req_id, first + len(drafts)))
            # The scheduler rolls the rejected drafts back; the runner hears it next step.
            state["computed"] = first - 1 + len(run)
            req_ids.append(req_id)
            sampled.append(run[0])
            emitted.append(run)
        return ModelRunnerOutput(
            req_ids=req_ids,
            sampled_token_ids=sampled,
            emitted_token_ids=emitted if out.scheduled_spec_decode_tokens else None,
        )

    def slot(self, state: dict, pos: int) -> tuple[int, int]:
        return state["blocks"][pos // BLOCK], pos % BLOCK


def propose(sched: Scheduler, rng: random.Random, k: int) -> None:
    """Drafts for each decoding request: the right continuation, wrong after a random point."""
    for r in sched.running:
        if r.num_tokens - r.num_computed_tokens != 1:
            continue
        n_right = rng.choice([0, 0, 1, 2, k, k])
        drafts = [token_at(r.request_id, r.num_tokens + j) for j in range(k)]
        for j in range(n_right, k):
            drafts[j] = 5  # never sampled (ids 10..999)
        r.spec_token_ids = drafts


def run(sched: Scheduler, requests: list[Request], seed: int, k: int) -> SpecRunner:
    runner, rng = SpecRunner(), random.Random(seed)
    kv = sched.kv_cache_manager
    for _ in range(5000):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        assert out.total_num_scheduled_tokens <= sched.max_num_batched_tokens
        runner_out = runner.execute(out) if out.total_num_scheduled_tokens else None
        sched.update_from_output(out, runner_out)
        for r in requests:
            held = kv.num_blocks_held(r.request_id)
            if r.status == RequestStatus.RUNNING:
                assert held == -(-r.num_computed_tokens // BLOCK), (r, held)
            else:
                assert held == 0, (r, held)
        propose(sched, rng, k)
    assert not sched.has_unfinished_requests()
    pool = kv.block_pool
    assert pool.num_free_blocks == pool.num_usable_blocks
    assert kv.req_to_blocks == {}
    stats = sched.make_stats()
    assert stats.num_free_blocks == stats.num_usable_blocks == pool.num_blocks - 1
    return runner


def make(num_blocks: int, budget: int, caching: bool) -> Scheduler:
    cfg = EngineConfig(
        block_size=BLOCK,
        max_num_batched_tokens=budget,
        max_num_seqs=8,
        enable_prefix_caching=caching,
    )
    return Scheduler(cfg, num_blocks, 4096)


def add(sched: Scheduler, req_id: str, prompt: list[int], max_tokens: int) -> Request:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    request = Request(req_id, prompt, params, [2], 0.0, BLOCK)
    sched.add_request(request)
    return request


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize(("num_blocks", "seed"), [(12, 0), (20, 1), (64, 2)])
def test_rejected_drafts_blocks_go_back_and_outputs_are_the_greedy_ones(num_blocks, seed, caching):
    sched = make(num_blocks, budget=24, caching=caching)
    shared = [100 + i for i in range(9)]  # a prefix two requests share (prefix-cache hits)
    prompts = {
        "a": shared + [7, 8],
        "b": shared + [9],
        "c": [300 + i for i in range(5)],
        "d": [400 + i for i in range(14)],
    }
    requests = [add(sched, rid, p, max_tokens=17 + i) for i, (rid, p) in enumerate(prompts.items())]
    runner = run(sched, requests, seed, k=6)
    for r in requests:
        want = [
            token_at(r.request_id, r.num_prompt_tokens + j) for j in range(len(r.output_token_ids))
        ]
        assert r.output_token_ids == want
        assert len(r.output_token_ids) == r.sampling_params.max_tokens
    # Drafts were rejected across block boundaries, so blocks were handed back mid-request.
    assert runner.num_dropped > 0
    assert sched.spec.counter.total_trials > sched.spec.counter.total_accepted > 0


def test_dropped_blocks_go_to_the_head_of_the_free_queue():
    sched = make(32, budget=32, caching=True)
    r = add(sched, "a", [100 + i for i in range(3)], max_tokens=30)
    runner = SpecRunner()
    out = sched.schedule()
    sched.update_from_output(out, runner.execute(out))
    # 4 tokens, 3 computed: the last token and 7 drafts fill slots 3..10, blocks 0..2.
    r.spec_token_ids = [5] * 7  # all wrong
    out = sched.schedule()
    assert out.scheduled_spec_decode_tokens == {"a": [5] * 7}
    tail = sched.kv_cache_manager.req_to_blocks["a"][1:]
    sched.update_from_output(out, runner.execute(out))
    assert sched.kv_cache_manager.num_blocks_held("a") == 1  # 4 tokens computed
    head = list(sched.kv_cache_manager.block_pool.free_queue)[: len(tail)]
    assert sorted(b.block_id for b in head) == sorted(b.block_id for b in tail)
    out = sched.schedule()
    assert out.scheduled_cached_reqs[0].num_dropped_blocks == 2
    sched.update_from_output(out, runner.execute(out))
