"""Scheduler: token budget, order, chunked prefill, preemption, stops, aborts and stats.

A fake runner mirrors what the real one sees (new/cached request data, dropped ids) and
simulates the KV cache slot by slot: it writes a value standing for the K/V of each computed
position (a hash of the whole prefix) and, before sampling, checks that every position a
request attends to holds the right value. Prefix caching, block tables and preemption are
thus checked end to end, and sampled tokens are a fixed function of (request, position), so
that recomputation after a preemption must give back exactly the same outputs.
"""

import zlib
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_core.config import EngineConfig
from engine_core.protocol import (
    EngineCoreOutput,
    FinishReason,
    Logprobs,
    ModelRunnerOutput,
    SamplingParams,
    SchedulerOutput,
)
from engine_core.sched.request import Request
from engine_core.sched.scheduler import Scheduler

EOS = 2
STOP, LENGTH = FinishReason.STOP, FinishReason.LENGTH


def token_at(req_id: str, position: int) -> int:
    """The token a request samples at a position: deterministic, never EOS (ids 10..999)."""
    return 10 + zlib.crc32(f"{req_id}:{position}".encode()) % 990


class FakeRunner:
    """Mirrors the model runner's state from SchedulerOutputs and checks the KV it would read."""

    def __init__(self, block_size: int, sample: Callable[[str, int], int] = token_at) -> None:
        self.block_size = block_size
        self.sample = sample
        self.reqs: dict[str, dict] = {}
        self.slots: dict[tuple[int, int], int] = {}  # (block id, offset) -> prefix value
        self.steps = 0

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self.steps += 1
        for req_id in (*out.finished_req_ids, *out.preempted_req_ids):
            self.reqs.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.reqs, f"{new.req_id} sent as new twice"
            self.reqs[new.req_id] = dict(
                tokens=new.prompt_token_ids + new.output_token_ids,
                computed=new.num_computed_tokens,
                blocks=list(new.block_ids),
            )
        for cached in out.scheduled_cached_reqs:
            state = self.reqs[cached.req_id]
            assert cached.num_computed_tokens == state["computed"]
            state["tokens"] += cached.new_token_ids
            state["blocks"] += cached.new_block_ids
        assert set(out.num_scheduled_tokens) == {
            r.req_id for r in out.scheduled_new_reqs + out.scheduled_cached_reqs
        }
        assert sum(out.num_scheduled_tokens.values()) == out.total_num_scheduled_tokens
        # Every new K/V of the step is written before any attention reads (as on the device).
        for req_id, n in out.num_scheduled_tokens.items():
            state = self.reqs[req_id]
            start, end = state["computed"], state["computed"] + n
            assert n >= 1 and end <= len(state["tokens"])
            assert len(state["blocks"]) * self.block_size >= end
            assert 0 not in state["blocks"], "the null block was handed to a request"
            values = prefix_values(state["tokens"][:end])
            for pos in range(start, end):
                self.slots[self.slot(state, pos)] = values[pos]
        req_ids, sampled = [], []
        for req_id, n in out.num_scheduled_tokens.items():
            state = self.reqs[req_id]
            state["computed"] += n
            end = state["computed"]
            values = prefix_values(state["tokens"][:end])
            for pos in range(end):
                assert self.slots.get(self.slot(state, pos)) == values[pos], (
                    f"{req_id} reads wrong K/V at position {pos}"
                )
            if end == len(state["tokens"]):
                req_ids.append(req_id)
                sampled.append(self.sample(req_id, end))
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled)

    def slot(self, state: dict, pos: int) -> tuple[int, int]:
        return state["blocks"][pos // self.block_size], pos % self.block_size


def prefix_values(tokens: list[int]) -> list[int]:
    values, v = [], 0
    for tok in tokens:
        v = zlib.crc32(f"{v}:{tok}".encode())
        values.append(v)
    return values


def make_scheduler(
    num_blocks: int = 64,
    budget: int = 64,
    max_num_seqs: int = 16,
    max_model_len: int = 4096,
    block_size: int = 4,
    **config,
) -> Scheduler:
    cfg = EngineConfig(
        block_size=block_size,
        max_num_batched_tokens=budget,
        max_num_seqs=max_num_seqs,
        **config,
    )
    return Scheduler(cfg, num_blocks, max_model_len)


def add(
    sched: Scheduler, req_id: str, prompt: list[int] | int, eos: list[int] = (EOS,), **params
) -> Request:
    if isinstance(prompt, int):
        prompt = [100 + (zlib.crc32(req_id.encode()) + i) % 800 for i in range(prompt)]
    request = Request(req_id, prompt, SamplingParams(**params), list(eos), 0.0, sched.block_size)
    sched.add_request(request)
    return request


def step(sched: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    out = sched.schedule()
    assert out.total_num_scheduled_tokens <= sched.max_num_batched_tokens
    runner_out = runner.execute(out) if out.total_num_scheduled_tokens > 0 else None
    return out, sched.update_from_output(out, runner_out)


def run_to_end(
    sched: Scheduler, runner: FakeRunner, max_steps: int = 10_000
) -> dict[str, list[EngineCoreOutput]]:
    """Step until no request is left; returns each request's outputs in order."""
    outputs: dict[str, list[EngineCoreOutput]] = {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return outputs
        _, outs = step(sched, runner)
        for o in outs:
            outputs.setdefault(o.request_id, []).append(o)
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def tokens_of(outs: list[EngineCoreOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def expected_tokens(request: Request, n: int) -> list[int]:
    return [token_at(request.request_id, request.num_prompt_tokens + k) for k in range(n)]


def assert_all_blocks_free(sched: Scheduler) -> None:
    pool = sched.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_usable_blocks
    assert sched.kv_cache_manager.req_to_blocks == {}


# ---------------------------------------------------------------- budget and order


def test_budget_is_respected_in_every_step_and_all_outputs_arrive():
    sched, runner = make_scheduler(budget=32), FakeRunner(4)
    reqs = [add(sched, f"r{i}", 5 + 13 * i, max_tokens=6) for i in range(6)]
    outputs = run_to_end(sched, runner)
    for r in reqs:
        assert tokens_of(outputs[r.request_id]) == expected_tokens(r, 6)
        assert outputs[r.request_id][-1].finish_reason == FinishReason.LENGTH
    assert_all_blocks_free(sched)


def test_running_requests_are_scheduled_before_waiting_ones():
    sched, runner = make_scheduler(budget=10), FakeRunner(4)
    add(sched, "a", 4, max_tokens=50)
    add(sched, "b", 4, max_tokens=50)
    step(sched, runner)  # both prefills fit: 8 tokens
    add(sched, "c", 30, max_tokens=5)
    out, _ = step(sched, runner)
    assert list(out.num_scheduled_tokens) == ["a", "b", "c"]
    assert out.num_scheduled_tokens == {"a": 1, "b": 1, "c": 8}
    assert [r.req_id for r in out.scheduled_cached_reqs] == ["a", "b"]
    assert [r.req_id for r in out.scheduled_new_reqs] == ["c"]


def test_max_num_seqs_is_respected():
    sched, runner = make_scheduler(budget=256, max_num_seqs=3), FakeRunner(4)
    for i in range(7):
        add(sched, f"r{i}", 4, max_tokens=4)
    seen = 0
    while sched.has_unfinished_requests():
        out, _ = step(sched, runner)
        assert sched.num_running <= 3
        assert len(out.num_scheduled_tokens) <= 3
        seen += len(out.scheduled_new_reqs)
    assert seen == 7


# ---------------------------------------------------------------- chunked prefill


def test_long_prompt_is_chunked_while_a_decode_keeps_getting_a_token():
    sched, runner = make_scheduler(num_blocks=400, budget=64), FakeRunner(4)
    add(sched, "dec", 4, max_tokens=40)
    step(sched, runner)
    long_req = add(sched, "long", 1000, max_tokens=2)
    prefill_steps = 0
    while long_req.num_output_tokens == 0:
        out, _ = step(sched, runner)
        prefill_steps += 1
        assert out.num_scheduled_tokens["dec"] == 1
        assert out.total_num_scheduled_tokens == min(64, 1 + 1000 - 63 * (prefill_steps - 1))
    assert prefill_steps == 16  # 1000 tokens at 63 a step beside the decode
    assert long_req.num_computed_tokens == 1000


def test_long_prefill_token_threshold_caps_each_chunk():
    sched, runner = make_scheduler(budget=64, long_prefill_token_threshold=16), FakeRunner(4)
    req = add(sched, "a", 40, max_tokens=1)
    chunks = []
    while sched.has_unfinished_requests():
        out, _ = step(sched, runner)
        chunks.append(out.num_scheduled_tokens["a"])
    assert chunks == [16, 16, 8]
    assert req.finish_reason == FinishReason.LENGTH


# ---------------------------------------------------------------- preemption


def test_preemption_takes_the_tail_and_nothing_is_lost_or_duplicated():
    # 12 usable blocks of 4 tokens; three running requests of 8-token prompts each grow to
    # 20 tokens; a fourth waits behind them (max_num_seqs).
    sched, runner = make_scheduler(num_blocks=13, budget=64, max_num_seqs=3), FakeRunner(4)
    reqs = [add(sched, f"r{i}", 8, max_tokens=12, ignore_eos=True) for i in range(4)]
    outputs: dict[str, list[EngineCoreOutput]] = {}
    victims = []
    while sched.has_unfinished_requests():
        running_before = [r.request_id for r in sched.running]
        out, outs = step(sched, runner)
        for o in outs:
            outputs.setdefault(o.request_id, []).append(o)
        preempted = set(out.preempted_req_ids)
        assert preempted <= set(running_before) and not preempted & set(out.finished_req_ids)
        if preempted:
            # The tail of running goes first, and lands at the head of waiting in its order.
            k = len(preempted)
            assert preempted == set(running_before[-k:])
            assert [r.request_id for r in sched.waiting][:k] == running_before[-k:]
            assert out.scheduled_new_reqs == []  # nothing is admitted in a step that preempts
            victims += sorted(preempted)
    assert victims, "the pool was meant to be too small for all three at once"
    assert "r0" not in victims
    for r in reqs:
        assert tokens_of(outputs[r.request_id]) == expected_tokens(r, 12)
        assert [o.finished for o in outputs[r.request_id]] == [False] * 11 + [True]
    assert sum(r.num_preemptions for r in reqs) == len(victims)
    assert_all_blocks_free(sched)


def test_nothing_is_admitted_in_a_step_that_preempts():
    # Without prefix hits and with a small budget, the victim's first chunk would fit at once.
    sched = make_scheduler(num_blocks=7, budget=5, enable_prefix_caching=False)
    runner = FakeRunner(4)
    reqs = [add(sched, f"r{i}", 8, max_tokens=12, ignore_eos=True) for i in range(2)]
    outputs: dict[str, list[EngineCoreOutput]] = {}
    num_preempting_steps = 0
    while sched.has_unfinished_requests():
        running_before = {r.request_id for r in sched.running}
        out, outs = step(sched, runner)
        if out.preempted_req_ids:
            assert set(out.preempted_req_ids) <= running_before
            num_preempting_steps += 1
            assert out.scheduled_new_reqs == []
        for o in outs:
            outputs.setdefault(o.request_id, []).append(o)
    assert num_preempting_steps > 0
    for r in reqs:
        assert tokens_of(outputs[r.request_id]) == expected_tokens(r, 12)
    assert_all_blocks_free(sched)


def test_resumed_request_is_sent_as_new_with_its_outputs():
    sched, runner = make_scheduler(num_blocks=7, budget=64), FakeRunner(4)  # 24 slots
    a = add(sched, "a", 8, max_tokens=10, ignore_eos=True)
    b = add(sched, "b", 8, max_tokens=10, ignore_eos=True)
    outputs: dict[str, list[EngineCoreOutput]] = {}
    resumed = None
    while sched.has_unfinished_requests():
        out, outs = step(sched, runner)
        if b.num_preemptions and resumed is None:
            resumed = next((n for n in out.scheduled_new_reqs if n.req_id == "b"), None)
            if resumed is not None:
                # Everything b sampled before its preemption goes back to the runner.
                assert len(resumed.output_token_ids) >= 1
                assert resumed.output_token_ids == tokens_of(outputs["b"])
        for o in outs:
            outputs.setdefault(o.request_id, []).append(o)
    assert b.num_preemptions == 1 and a.num_preemptions == 0 and resumed is not None
    assert tokens_of(outputs["a"]) == expected_tokens(a, 10)
    assert tokens_of(outputs["b"]) == expected_tokens(b, 10)
    # The prefix hit reported is that of the first schedule, not of the recompute.
    assert sched.make_stats().prefix_cache_hits > 0
    assert outputs["b"][-1].num_cached_tokens == 0
    assert_all_blocks_free(sched)


def test_drop_list_of_a_step_with_nothing_scheduled_is_sent_again():
    sched, runner = make_scheduler(num_blocks=5), FakeRunner(4)
    add(sched, "a", 4, max_tokens=50)
    step(sched, runner)
    sched.finish_requests(["a"])
    add(sched, "big", 40)  # fails at admission: nothing is scheduled this step
    out = sched.schedule()
    assert out.total_num_scheduled_tokens == 0 and "a" in out.finished_req_ids
    (err,) = sched.update_from_output(out, None)  # the core skips the runner for an empty step
    assert err.request_id == "big" and err.finish_reason == FinishReason.ERROR
    add(sched, "c", 4, max_tokens=2)
    out, _ = step(sched, runner)
    assert {"a", "big"} <= set(out.finished_req_ids) and "a" not in runner.reqs
    out, _ = step(sched, runner)
    assert out.finished_req_ids == []


def test_no_starvation_under_constant_load():
    sched, runner = make_scheduler(num_blocks=40, budget=48, max_num_seqs=8), FakeRunner(4)
    added, outputs, first_step = 0, {}, {}
    for n in range(600):
        while sched.num_running + sched.num_waiting < 12 and added < 60:
            add(sched, f"r{added}", 6 + (added * 7) % 30, max_tokens=8 + added % 9, ignore_eos=True)
            first_step[f"r{added}"] = n
            added += 1
        _, outs = step(sched, runner)
        for o in outs:
            outputs.setdefault(o.request_id, []).append(o)
            if o.finished:
                assert n - first_step[o.request_id] < 200, f"{o.request_id} waited too long"
        if not sched.has_unfinished_requests():
            break
    assert added == 60
    assert all(outputs[f"r{i}"][-1].finished for i in range(60))
    assert all(len(tokens_of(outputs[f"r{i}"])) == 8 + i % 9 for i in range(60))
    assert_all_blocks_free(sched)


def test_request_too_big_for_the_pool_ends_with_error():
    sched, runner = make_scheduler(num_blocks=5, budget=8), FakeRunner(4)  # 16 token slots
    add(sched, "big", 20, max_tokens=3)
    small = add(sched, "small", 4, max_tokens=3, ignore_eos=True)
    outputs = run_to_end(sched, runner)
    (err,) = outputs["big"]
    assert err.finish_reason == FinishReason.ERROR and err.new_token_ids == []
    assert "20 tokens" in err.error and "4 blocks" in err.error
    assert tokens_of(outputs["small"]) == expected_tokens(small, 3)
    assert_all_blocks_free(sched)


def test_request_that_outgrows_the_pool_while_decoding_ends_with_error():
    sched, runner = make_scheduler(num_blocks=5, budget=8), FakeRunner(4)  # 16 token slots
    grow = add(sched, "grow", 6, max_tokens=100, ignore_eos=True)
    outputs = run_to_end(sched, runner)
    outs = outputs["grow"]
    assert outs[-1].finish_reason == FinishReason.ERROR and "more than the whole KV cache" in (
        outs[-1].error
    )
    # It got every token the pool could hold: 16 slots, of which the last sampled token needs none.
    assert tokens_of(outs) == expected_tokens(grow, 16 - 6 + 1)
    assert sched.make_stats().num_preemptions == 0
    assert_all_blocks_free(sched)


# ---------------------------------------------------------------- stop conditions


def scripted(tokens: dict[str, list[int]]) -> Callable[[str, int], int]:
    """A sampler that replays a script per request, then repeats its last token."""
    counts: dict[str, int] = {}

    def sample(req_id: str, position: int) -> int:
        k = counts.get(req_id, 0)
        counts[req_id] = k + 1
        seq = tokens[req_id]
        return seq[min(k, len(seq) - 1)]

    return sample


@pytest.mark.parametrize(
    "params, script, want_tokens, want_reason, want_stop_reason",
    [
        (dict(max_tokens=10), [11, 12, EOS, 13], [11, 12, EOS], STOP, None),
        (dict(max_tokens=5, ignore_eos=True), [11, EOS], [11, EOS, EOS, EOS, EOS], LENGTH, None),
        (dict(max_tokens=10, min_tokens=3), [EOS, EOS, EOS, 11], [EOS, EOS, EOS], STOP, None),
        (
            dict(max_tokens=10, min_tokens=4),
            [EOS, 11, 12, 13, EOS],
            [EOS, 11, 12, 13, EOS],
            STOP,
            None,
        ),
        (dict(max_tokens=10, stop_token_ids=[42]), [11, 42, 12], [11, 42], STOP, 42),
        (dict(max_tokens=10, stop_token_ids=[42], min_tokens=2), [42, 42], [42, 42], STOP, 42),
        (dict(max_tokens=10, stop_token_ids=[42], ignore_eos=True), [EOS, 42], [EOS, 42], STOP, 42),
        (dict(max_tokens=3), [11, 12, 13, 14], [11, 12, 13], LENGTH, None),
        (dict(max_tokens=3), [11, 12, EOS], [11, 12, EOS], STOP, None),
        (dict(max_tokens=None), [11], [11] * 6, LENGTH, None),  # max_model_len 10, prompt 4
    ],
)
def test_stop_conditions(params, script, want_tokens, want_reason, want_stop_reason):
    sched = make_scheduler(max_model_len=10)
    runner = FakeRunner(4, sample=scripted({"a": script}))
    add(sched, "a", 4, **params)
    outs = run_to_end(sched, runner)["a"]
    assert tokens_of(outs) == want_tokens
    assert all(not o.finished for o in outs[:-1])
    assert outs[-1].finish_reason == want_reason
    assert outs[-1].stop_reason == want_stop_reason
    assert_all_blocks_free(sched)


def test_token_sampled_after_a_partial_prefill_is_discarded():
    sched = make_scheduler(budget=8)
    req = add(sched, "a", 12, max_tokens=3)
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 8}
    outs = sched.update_from_output(out, ModelRunnerOutput(req_ids=["a"], sampled_token_ids=[11]))
    assert outs == [] and req.output_token_ids == [] and req.num_computed_tokens == 8
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 4}
    assert out.scheduled_cached_reqs[0].new_token_ids == []
    outs = sched.update_from_output(out, ModelRunnerOutput(req_ids=["a"], sampled_token_ids=[12]))
    assert tokens_of(outs) == [12] and req.num_computed_tokens == 12


def test_logprobs_travel_with_their_token():
    sched = make_scheduler()
    add(sched, "a", 4, max_tokens=1)
    add(sched, "b", 4, max_tokens=1)
    out = sched.schedule()
    lp = Logprobs(token_ids=[11], logprobs=[-0.5])
    outs = sched.update_from_output(
        out, ModelRunnerOutput(req_ids=["a", "b"], sampled_token_ids=[11, 12], logprobs=[lp, None])
    )
    assert [o.new_logprobs for o in outs] == [[lp], None]


# ---------------------------------------------------------------- aborts and validation


def test_abort_frees_blocks_of_running_and_waiting_requests():
    sched, runner = make_scheduler(budget=16, max_num_seqs=2), FakeRunner(4)
    for rid in ("a", "b", "c"):
        add(sched, rid, 6, max_tokens=50)
    step(sched, runner)
    assert sched.num_running == 2 and sched.num_waiting == 1
    assert sched.finish_requests(["a", "c", "nope"]) == ["a", "c"]
    assert sched.finish_requests(["a"]) == []
    assert sched.num_running == 1 and sched.num_waiting == 0
    out, _ = step(sched, runner)
    assert {"a", "c"} <= set(out.finished_req_ids)
    assert sched.finish_requests(["b"]) == ["b"]
    assert not sched.has_unfinished_requests()
    assert_all_blocks_free(sched)


def test_abort_between_schedule_and_update_is_harmless():
    sched, runner = make_scheduler(), FakeRunner(4)
    add(sched, "a", 6, max_tokens=5)
    add(sched, "b", 6, max_tokens=5, ignore_eos=True)
    out = sched.schedule()
    runner_out = runner.execute(out)
    sched.finish_requests(["a"])
    outs = sched.update_from_output(out, runner_out)
    assert [o.request_id for o in outs] == ["b"]
    run_to_end(sched, runner)
    assert_all_blocks_free(sched)


def test_add_request_rejects_bad_requests():
    sched = make_scheduler(max_model_len=8)
    with pytest.raises(ValueError, match="the prompt has 8 tokens, but max_model_len is 8"):
        add(sched, "long", 8)
    add(sched, "a", 7)
    with pytest.raises(ValueError, match="request id 'a' is already in the scheduler"):
        add(sched, "a", 3)
    with pytest.raises(AssertionError, match="block_size 8"):
        sched.add_request(Request("b", [1], SamplingParams(), [EOS], 0.0, 8))
    with pytest.raises(ValueError, match="at least one token"):
        Request("c", [], SamplingParams(), [EOS], 0.0, 4)


# ---------------------------------------------------------------- prefix cache


def test_same_step_requests_share_the_prompt_and_stats_count_tokens():
    sched, runner = make_scheduler(budget=256), FakeRunner(4)
    prompt = list(range(100, 130))  # 30 tokens: 7 full blocks
    for i in range(3):  # n=3 fanned out by the frontend
        add(sched, f"s{i}", prompt, max_tokens=4, ignore_eos=True)
    out, _ = step(sched, runner)
    assert out.num_scheduled_tokens == {"s0": 30, "s1": 2, "s2": 2}
    assert [n.num_computed_tokens for n in out.scheduled_new_reqs] == [0, 28, 28]
    assert out.scheduled_new_reqs[1].block_ids[:7] == out.scheduled_new_reqs[0].block_ids[:7]
    stats = sched.make_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (90, 56)
    assert stats.num_running_reqs == 3 and stats.num_waiting_reqs == 0
    assert 0 < stats.kv_cache_usage < 1
    assert sched.make_stats().prefix_cache_queries == 0  # counters restart after each call
    outputs = run_to_end(sched, runner)
    assert all(o[-1].num_cached_tokens == (0 if r == "s0" else 28) for r, o in outputs.items())
    assert_all_blocks_free(sched)


def test_finished_request_prefix_is_reused_and_reset_prefix_cache_clears_it():
    sched, runner = make_scheduler(), FakeRunner(4)
    prompt = list(range(200, 221))
    add(sched, "a", prompt, max_tokens=2)
    step(sched, runner)
    assert sched.reset_prefix_cache() is False  # a holds blocks
    run_to_end(sched, runner)
    sched.make_stats()
    add(sched, "b", prompt, max_tokens=2)
    run_to_end(sched, runner)
    assert sched.make_stats().prefix_cache_hits == 20
    assert sched.reset_prefix_cache() is True
    add(sched, "c", prompt, max_tokens=2)
    run_to_end(sched, runner)
    assert sched.make_stats().prefix_cache_hits == 0


def test_prefix_caching_disabled_counts_nothing():
    sched = make_scheduler(enable_prefix_caching=False)
    runner = FakeRunner(4)
    prompt = list(range(200, 221))
    add(sched, "a", prompt, max_tokens=2)
    add(sched, "b", prompt, max_tokens=2)
    out, _ = step(sched, runner)
    assert out.num_scheduled_tokens == {"a": 21, "b": 21}
    stats = sched.make_stats()
    assert stats.prefix_cache_queries == stats.prefix_cache_hits == 0


# ---------------------------------------------------------------- random workloads

workload = st.lists(
    st.tuples(
        st.integers(0, 6),  # arrival step
        st.integers(1, 40),  # prompt length
        st.integers(1, 12),  # max_tokens
        st.integers(0, 3),  # which shared prefix (0: none)
        st.booleans(),  # aborted after a few steps
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workload,
    st.integers(8, 40),  # usable blocks + 1
    st.sampled_from([4, 8]),  # block size
    st.integers(8, 64),  # budget
    st.integers(1, 6),  # max_num_seqs
    st.sampled_from([0, 8]),  # long_prefill_token_threshold
    st.booleans(),  # enable_prefix_caching
)
def test_random_workload_keeps_invariants(
    reqs, num_blocks, bs, budget, max_seqs, threshold, prefix_caching
):
    sched = make_scheduler(
        num_blocks=num_blocks,
        budget=budget,
        max_num_seqs=max_seqs,
        block_size=bs,
        long_prefill_token_threshold=threshold,
        enable_prefix_caching=prefix_caching,
    )
    runner = FakeRunner(bs)
    pool = sched.kv_cache_manager.block_pool
    prefixes = {k: [50 + k] * (3 * k + 5) for k in range(1, 4)}
    requests: dict[str, Request] = {}
    outputs: dict[str, list[EngineCoreOutput]] = {}
    for n in range(2000):
        for i, (arrival, plen, max_tokens, prefix, _) in enumerate(reqs):
            if arrival == n:
                prompt = prefixes.get(prefix, []) + [300 + i * 41 + j for j in range(plen)]
                req = Request(
                    f"q{i}",
                    prompt,
                    SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                    [EOS],
                    0.0,
                    bs,
                )
                sched.add_request(req)
                requests[req.request_id] = req
        if n == 5:
            sched.finish_requests([f"q{i}" for i, r in enumerate(reqs) if r[4]])
        if not sched.has_unfinished_requests() and n > 6:
            break
        out, outs = step(sched, runner)
        for o in outs:
            assert not (outputs.get(o.request_id) and outputs[o.request_id][-1].finished)
            outputs.setdefault(o.request_id, []).append(o)
        # Invariants after every step.
        assert out.total_num_scheduled_tokens <= budget
        assert sched.num_running <= max_seqs
        if threshold:
            assert all(v <= threshold for v in out.num_scheduled_tokens.values())
        tables = sched.kv_cache_manager.req_to_blocks
        held = {}
        for blocks in tables.values():
            for b in blocks:
                held[b.block_id] = held.get(b.block_id, 0) + 1
        assert all(pool.blocks[bid].ref_cnt == cnt for bid, cnt in held.items())
        assert len(held) + pool.num_free_blocks == pool.num_usable_blocks
        assert set(tables) <= {r.request_id for r in sched.running}
        assert all(b.block_hash == h for h, b in pool.cached_blocks.items())
        assert prefix_caching or not pool.cached_blocks
    else:
        raise AssertionError("workload did not finish")
    assert_all_blocks_free(sched)
    for rid, req in requests.items():
        outs = outputs.get(rid, [])
        if req.finish_reason == FinishReason.ABORT:
            assert not outs or not outs[-1].finished
            assert tokens_of(outs) == expected_tokens(req, len(tokens_of(outs)))
        elif req.finish_reason == FinishReason.ERROR:
            assert outs[-1].finish_reason == FinishReason.ERROR
            assert req.num_tokens > pool.num_usable_blocks * bs
        else:
            assert req.finish_reason == FinishReason.LENGTH
            assert tokens_of(outs) == expected_tokens(req, req.sampling_params.max_tokens)
