"""Speculative decoding with tensor parallelism: the drafts reach every rank with the step.

The default model's 9 heads do not split over 2 ranks, so this runs a tiny random Llama
(8 heads, 4 KV heads): the one tests/engine_core/executor/test_tensor_parallel.py runs.
"""

from __future__ import annotations

import pytest

from engine_core.config import EngineConfig
from engine_core.protocol import EngineCoreRequest, SamplingParams
from tests.engine_core.executor.test_tensor_parallel import TP_LLAMA

pytestmark = pytest.mark.slow

PROMPTS = [[3] * 20, [5, 6, 7, 8, 9] * 6, list(range(10, 40))]
NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 3,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 3,
}


def generate(config: EngineConfig) -> tuple[list[list[int]], int, bool]:
    """(tokens per prompt, drafts verified, every KV block free at the end)."""
    from engine_core.core import EngineCore

    core = EngineCore(config)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        for i, prompt in enumerate(PROMPTS):
            core.add_request(EngineCoreRequest(str(i), prompt, params))
        tokens: list[list[int]] = [[] for _ in PROMPTS]
        drafts = 0
        while core.has_work():
            out = core.step()
            drafts += out.scheduler_stats.spec_num_draft_tokens
            for o in out.outputs:
                assert o.error is None, o.error
                tokens[int(o.request_id)] += o.new_token_ids
        pool = core.scheduler.kv_cache_manager.block_pool
        return tokens, drafts, pool.num_free_blocks == pool.num_usable_blocks
    finally:
        core.shutdown()


def test_two_ranks_with_drafts_generate_what_one_generates_without(make_tiny_llama):
    path = make_tiny_llama("spec_tp_llama", **TP_LLAMA)
    common = dict(model=path, dtype="float32", kv_cache_space_gib=0.02)
    one, _, _ = generate(EngineConfig(tensor_parallel_size=1, **common))
    two, drafts, all_free = generate(
        EngineConfig(tensor_parallel_size=2, speculative_config=NGRAM, **common)
    )
    assert all(len(t) == 24 for t in one)
    assert two == one
    assert drafts > 0 and all_free
