"""The off-switch: drafts where they raise the step's expected throughput, none elsewhere."""

import pytest

from engine_core.spec_decode.switch import StepCostModel, choose_drafts, request_alpha


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
