"""A drafted step through the real runner: its 1 + k queries attend as single-query rows.

A tiny random Llama in this process; an oracle proposer that knows the greedy continuation
(from a run without speculation) proposes it right, wrong after a point, or all wrong, so
that runs of accepted drafts, rejections at every position and full acceptance all happen,
beside a request still in prefill. Greedy tokens must be the ones without speculation.
"""

from __future__ import annotations

import functools
import random

import pytest

from engine_core.config import EngineConfig
from engine_core.protocol import EngineCoreRequest, SamplingParams
from engine_core.sched.request import Request

PROMPTS = [[3] * 20, [5, 6, 7, 8, 9] * 6, list(range(10, 40)), list(range(40, 110))]
NEW = 24

pytestmark = pytest.mark.slow  # two engines (tiny ones) in this process


class OracleProposer:
    def __init__(self, truth: dict[str, list[int]], seed: int) -> None:
        self.truth = truth
        self.rng = random.Random(seed)

    def propose(self, request: Request, max_drafts: int) -> list[int]:
        done = request.num_output_tokens
        right = self.truth[request.request_id][done : done + max_drafts]
        n_right = self.rng.choice([0, 1, 2, len(right)])
        return right[:n_right] + [7] * (len(right) - n_right)

    def finish(self, request: Request, completed: bool) -> None:
        pass


def generate(config: EngineConfig, truth=None, split: bool | None = None, **runner_kw):
    """(tokens per request, draft tokens verified, accepted); runner_kw go to the ModelRunner."""
    from engine_core.core import EngineCore
    from engine_core.executor import uniproc

    make_runner = uniproc.ModelRunner
    uniproc.ModelRunner = functools.partial(make_runner, **runner_kw)
    try:
        core = EngineCore(config)
    finally:
        uniproc.ModelRunner = make_runner
    try:
        if split is not None:
            core.executor.runner.split_drafted_rows = split
        if truth is not None:
            assert core.drafter is not None
            core.drafter.proposer = OracleProposer(truth, seed=0)
        params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
        for i, prompt in enumerate(PROMPTS):
            core.add_request(EngineCoreRequest(str(i), prompt, params))
        tokens: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
        accepted = drafted = 0
        while core.has_work():
            out = core.step()
            drafted += out.scheduler_stats.spec_num_draft_tokens
            accepted += out.scheduler_stats.spec_num_accepted_tokens
            for o in out.outputs:
                assert o.error is None, o.error
                tokens[o.request_id] += o.new_token_ids
        pool = core.scheduler.kv_cache_manager.block_pool
        assert pool.num_free_blocks == pool.num_usable_blocks
        return tokens, drafted, accepted
    finally:
        core.shutdown()


SPEC = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def common(make_tiny_llama) -> dict:
    path = make_tiny_llama("verify_rows_llama", initializer_range=0.1)
    return dict(
        model=path,
        dtype="float32",
        kv_cache_space_gib=0.02,
        block_size=4,
        max_num_batched_tokens=48,
        max_num_seqs=16,
        num_threads=1,
    )


@pytest.mark.parametrize("split", [False, True], ids=["one_row", "split_rows"])
def test_drafted_rows_give_the_tokens_of_plain_decoding(common, split):
    want, _, _ = generate(EngineConfig(**common))
    assert all(len(t) == NEW for t in want.values())
    config = EngineConfig(speculative_config=SPEC, **common)
    got, drafted, accepted = generate(config, want, split=split)
    assert got == want
    assert drafted > accepted > 0


def test_drafted_decode_steps_replay_the_decode_graphs(common):
    """The cuda backend (torch references on a CPU) with a stand-in capture: drafted steps
    are pure-decode steps of B * (1 + k) rows, replayed in the buckets above B."""
    from tests.engine_core.worker.test_cuda_path import CountingCapture

    want, _, _ = generate(EngineConfig(**common), attention_backend="cuda")
    capture = CountingCapture()
    config = EngineConfig(speculative_config=SPEC, **common)
    got, drafted, accepted = generate(config, want, attention_backend="cuda", graph_capture=capture)
    assert got == want
    assert drafted > accepted > 0
    # Four requests decode in buckets up to 4 without drafts: 8 and 16 are drafted steps.
    assert capture.replays[8] + capture.replays[16] > 0, capture.replays
