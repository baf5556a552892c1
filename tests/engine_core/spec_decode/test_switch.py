"""The off-switch: drafts where they raise the step's expected throughput, none elsewhere."""

import pytest

from engine_core.protocol import SamplingParams
from engine_core.sched.request import Request
from engine_core.spec_decode.stats import SpecDecodingCounter
from engine_core.spec_decode.switch import (
    PositionAcceptance,
    ProbabilityCalibration,
    StepCostModel,
    choose_drafts,
    choose_from_gains,
    request_alpha,
)


def test_a_single_stream_drafts_even_at_modest_acceptance():
    assert choose_drafts([0.5], [5], num_tokens=1, budget=100, slope_ratio=1 / 64) == [5]


def test_a_large_batch_keeps_only_drafts_that_are_almost_always_accepted():
    # b*N comparable to a: 64 requests at slope 1/64.
    chosen = choose_drafts(
        [0.3] * 63 + [0.99], [5] * 64, num_tokens=64, budget=2048, slope_ratio=1 / 64
    )
    assert chosen[:63] == [0] * 63 and chosen[63] >= 1


def test_no_acceptance_or_no_budget_means_no_drafts():
    assert choose_drafts([0.0, 0.0], [4, 4], 2, 100, 1 / 64) == [0, 0]
    assert choose_drafts([0.9, 0.9], [4, 4], 2, 0, 1 / 64) == [0, 0]
    assert sum(choose_drafts([0.9, 0.9], [4, 4], 2, 3, 1 / 64)) == 3


def test_drafts_go_to_the_requests_that_accept_more():
    chosen = choose_drafts([0.9, 0.2], [4, 4], 2, 100, 1 / 8)
    assert chosen[0] > chosen[1]


def test_explicit_gains_keep_a_prefix_and_stop_at_a_branch():
    # Drafts sure up to a branch (p 0.3 past it): the ones past it do not pay at slope 1/4.
    gains = [[0.95, 0.9, 0.86, 0.3, 0.28, 0.27]]
    assert choose_from_gains(gains, 1, 100, 1 / 4) == [3]
    assert choose_from_gains(gains, 1, 100, 1 / 1000) == [6]  # nearly free: all
    assert choose_from_gains([[], [0.9]], 2, 100, 1 / 64) == [0, 1]


def test_per_position_rates_come_from_what_the_counter_saw():
    counter = SpecDecodingCounter()
    request = Request("a", [1, 2, 3], SamplingParams(), [0], 0.0, 16)
    for _ in range(30):  # always right for 3 drafts, always wrong at the 4th
        counter.observe(request, num_drafts=6, num_accepted=3)
    positions = PositionAcceptance()
    positions.observe(counter.position_trials, counter.position_accepted)
    assert counter.position_trials == [30] * 4 and counter.position_accepted == [30] * 3 + [0]
    gains = positions.gains(alpha=0.9, k=6, engine_alpha=0.5)
    # min(alpha, rate) at the first three (rate ~0.97), then the 4th's rate ~0.03, then the
    # unseen positions at the engine's alpha.
    assert gains[:3] == pytest.approx([0.9, 0.81, 0.729])
    assert gains[3] < 0.03 and gains[4] == pytest.approx(gains[3] * 0.5)
    # The same totals again are no new data.
    positions.observe(counter.position_trials, counter.position_accepted)
    assert positions.gains(alpha=0.9, k=6, engine_alpha=0.5) == pytest.approx(gains)


def test_the_cost_model_recovers_a_linear_step_time():
    model = StepCostModel()
    assert model.slope_ratio() == pytest.approx(1 / 64)  # the prior until it has data
    for i in range(200):
        n = 1 + (i * 37) % 300
        model.observe(n, 0.02 + 0.0001 * n)
    assert model.slope_ratio() == pytest.approx(0.0001 / 0.02, rel=1e-3)


def test_a_request_without_history_takes_the_engine_wide_acceptance():
    assert request_alpha(0.0, 0.0, 0.7) == pytest.approx(0.7)
    assert request_alpha(90.0, 100.0, 0.1) > 0.85


def test_the_cost_model_learns_from_decode_steps_only():
    """A prefill chunk's tokens cost a fraction of a decode row's each: fitting them in would
    make drafts look cheap. Only steps where every request decoded (and drafted) count."""
    from engine_core.config import EngineConfig
    from engine_core.protocol import ModelRunnerOutput, SamplingParams
    from engine_core.sched.request import Request
    from engine_core.sched.scheduler import Scheduler
    from engine_core.spec_decode import make_drafter

    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    config = EngineConfig(block_size=4, max_num_batched_tokens=64, speculative_config=spec)
    sched = Scheduler(config, 64, 1024)
    drafter = make_drafter(config)
    assert drafter is not None
    sched.add_request(Request("a", [5, 6, 7] * 4, SamplingParams(max_tokens=20), [2], 0.0, 4))
    decoded = []
    for _ in range(6):
        out = sched.schedule()
        ids = list(out.num_scheduled_tokens)
        sampled = ModelRunnerOutput(req_ids=ids, sampled_token_ids=[5] * len(ids))
        if out.scheduled_spec_decode_tokens:
            sampled.emitted_token_ids = [[5] for _ in ids]  # every draft rejected
        sched.update_from_output(out, sampled)
        drafter.propose(sched)
        before = drafter.cost._w
        drafter.observe_step(out.total_num_scheduled_tokens, 0.05)
        decoded.append(drafter.cost._w > before)
    # The 12-token prefill is not data; every decode step after it is.
    assert decoded == [False] + [True] * 5


def test_an_engine_whose_drafts_all_failed_drafts_again_later():
    """The engine-wide acceptance drifts back to its prior while nothing is verified: the
    off-switch does not stay off for good after a run of rejections."""
    from engine_core.config import EngineConfig
    from engine_core.protocol import ModelRunnerOutput, SamplingParams
    from engine_core.sched.request import Request
    from engine_core.sched.scheduler import Scheduler
    from engine_core.spec_decode import make_drafter

    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    config = EngineConfig(block_size=4, max_num_batched_tokens=64, speculative_config=spec)
    sched = Scheduler(config, 64, 1024)
    drafter = make_drafter(config)
    assert drafter is not None
    request = Request("a", [5, 6, 7] * 4, SamplingParams(max_tokens=500), [2], 0.0, 4)
    sched.add_request(request)
    out = sched.schedule()
    sched.update_from_output(out, ModelRunnerOutput(req_ids=["a"], sampled_token_ids=[5]))
    for _ in range(50):
        drafter.acceptance.observe(0, 10)  # a long run of rejected drafts, engine-wide
    request.spec_accepted, request.spec_trials = 0.0, 40.0
    drafter.propose(sched)
    assert request.spec_token_ids == []  # off: nothing pays at acceptance ~0
    alpha_off = drafter.acceptance.alpha
    steps = 0
    while not request.spec_token_ids:
        steps += 1
        assert steps < 1000, "the off-switch never turned back on"
        drafter.propose(sched)
    assert request.spec_token_ids == [6, 7, 5][: len(request.spec_token_ids)]
    assert drafter.acceptance.alpha > alpha_off


def test_calibration_starts_at_the_proposers_word_and_learns_a_branch_that_never_repeats():
    cal = ProbabilityCalibration()
    assert cal.rate(0.5) == pytest.approx(0.5) and cal.rate(1.0) == pytest.approx(1.0)
    for _ in range(20):  # a sure draft accepted, then a 1-in-2 one rejected every time
        cal.observe([1.0, 0.5, 0.7, 0.7], num_verified=4, num_accepted=1)
    assert cal.rate(0.5) < 0.1
    # The drafts after the rejection were never tried: nothing learned about them.
    assert cal.rate(0.7) == pytest.approx(0.7)
    cal.observe([0.9, 0.7], num_verified=1, num_accepted=0)  # only the first was verified
    assert cal.rate(0.7) == pytest.approx(0.7) and cal.rate(0.9) == pytest.approx(0.6)
    # A draft with no other continuation is left to the per-position rates.
    for _ in range(20):
        cal.observe([1.0], num_verified=1, num_accepted=0)
    assert cal.rate(1.0) == 1.0
    assert cal.path([1.0, 0.5, 1.0]) == pytest.approx([1.0, cal.rate(0.5), cal.rate(0.5)])


def _agent_loop_drafts(calibrate: bool) -> tuple[list[list[int]], dict[int, list[int]]]:
    """Twelve tool calls, each the same but for one argument, new every time, as the engine
    would verify them (a made-up model that emits the call): the drafts each request got
    right after the argument's branch, and those the last request got at each position."""
    from engine_core.config import EngineConfig
    from engine_core.protocol import ModelRunnerOutput, SamplingParams
    from engine_core.sched.scheduler import Scheduler
    from engine_core.spec_decode import make_drafter

    config = EngineConfig(
        block_size=4, max_num_batched_tokens=64, speculative_config={"method": "suffix"}
    )
    sched = Scheduler(config, 256, 1024)
    drafter = make_drafter(config)
    assert drafter is not None
    if not calibrate:
        drafter.calibration.rate = lambda q: q
    for n in range(1, 30):  # a measured step time: a row costs a third of a step's fixed cost
        drafter.cost.observe(n, 0.003 * (3 + n))
    # Two earlier exchanges in the prompt, each a question (30, 31) and its call 1 2 3
    # <argument> 4 5 6 7 8 9, arguments 10 and 11; then a new question and the call's start.
    call = [1, 2, 3, None, 4, 5, 6, 7, 8, 9]
    at_branch = []
    drafts_at: dict[int, list[int]] = {}
    for i in range(12):
        prompt = [30, *(t or 10 for t in call), 31, *(t or 11 for t in call), 40 + i, 1, 2]
        target = [t or 20 + i for t in call[2:]]  # 3, a new argument, 4 5 6 7 8 9
        request = Request(str(i), prompt, SamplingParams(max_tokens=len(target)), [0], 0.0, 4)
        sched.add_request(request)
        drafts_at = {}
        while not request.is_finished:
            out = sched.schedule()
            pos = request.num_output_tokens
            spec = out.scheduled_spec_decode_tokens.get(str(i), [])
            drafts_at[pos] = list(spec)
            emitted = []
            for d in spec:
                if d != target[pos + len(emitted)]:
                    break
                emitted.append(d)
            emitted.append(target[pos + len(emitted)])
            runner = ModelRunnerOutput(req_ids=[str(i)], sampled_token_ids=[emitted[0]])
            if spec:
                runner.emitted_token_ids = [emitted]
            sched.update_from_output(out, runner)
            drafter.propose(sched)
            n = out.total_num_scheduled_tokens
            drafter.observe_step(n, 0.003 * (3 + n))
        assert request.output_token_ids == target
        at_branch.append(drafts_at.get(1, []))
    return at_branch, drafts_at


def test_suffix_drafts_stop_at_a_branch_whose_continuation_is_new_every_time():
    """An agent's tool call: the tree says 1/2 for each of the two earlier arguments at the
    branch, so drafts go past it; once verification has rejected that a few times, they end
    at the branch, while the sure part after it is still drafted."""
    tree_word, _ = _agent_loop_drafts(calibrate=False)
    assert all(d[:1] in ([10], [11]) for d in tree_word[4:]), tree_word
    learned, last = _agent_loop_drafts(calibrate=True)
    assert learned[4:] == [[]] * 8, learned
    assert last.get(3), last  # after "4": drafts of the sure part


def test_a_rejection_at_a_branch_counts_against_the_branch_only():
    """Suffix drafts: a sure draft, then a 1-in-2 branch the model never takes, then sure ones.
    The branch's rejections lower its calibrated q, not the rate of its position; a sure
    draft rejected at that position does lower it."""
    from engine_core.config import EngineConfig
    from engine_core.sched.scheduler import Scheduler
    from engine_core.spec_decode import make_drafter

    config = EngineConfig(block_size=4, speculative_config={"method": "suffix"})
    sched = Scheduler(config, 256, 1024)
    drafter = make_drafter(config)
    assert drafter is not None
    request = Request("a", [1, 2, 3], SamplingParams(), [0], 0.0, 4)
    sched.add_request(request)
    sched.schedule()
    drafter.propose(sched)  # tracks the running request

    def verify(qs: list[float], num_accepted: int) -> None:
        # As after a step: the drafter gave these drafts, the scheduler counted the outcome.
        drafter._pending_probs["a"] = qs
        sched.spec.counter.observe(request, len(qs), num_accepted)
        drafter.propose(sched)

    for _ in range(30):
        verify([1.0, 0.5, 1.0, 1.0], num_accepted=1)
    assert drafter.calibration.rate(0.5) < 0.1
    gains = drafter.positions.gains(alpha=1.0, k=3, engine_alpha=0.5)
    # Position 0: 30 sure drafts accepted; position 1: no sure draft seen, the prior.
    assert gains[0] > 0.9 and gains[1] == pytest.approx(gains[0] * 0.5)
    for _ in range(30):
        verify([1.0, 1.0], num_accepted=1)  # now a sure draft rejected at position 1
    assert drafter.positions.gains(alpha=1.0, k=2, engine_alpha=0.5)[1] < 0.1 * gains[0]
