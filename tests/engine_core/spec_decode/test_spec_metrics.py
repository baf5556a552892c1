"""Acceptance counts in SchedulerStats and /metrics count what the engine actually did."""

from __future__ import annotations

import pytest

from engine_core.config import EngineConfig
from engine_core.protocol import EngineCoreRequest, SamplingParams
from frontend.metrics import Metrics

pytestmark = pytest.mark.slow

_PROMPT = "a b c d e f g a b c d e f g a b c d e f g a b c"


def test_accepted_tokens_are_the_extra_tokens_the_steps_emitted():
    from engine_core.core import EngineCore
    from frontend.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    config = EngineConfig(
        dtype="float32",
        num_gpu_blocks_override=64,
        speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1},
    )
    core = EngineCore(config)
    metrics = Metrics("m", core.max_model_len)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    for i, prompt in enumerate((_PROMPT, "The capital of France is")):
        core.add_request(EngineCoreRequest(str(i), tok.encode(prompt), params))
    events = tokens = drafts = draft_tokens = accepted = 0
    per_pos = [0, 0, 0]
    max_per_event = 0
    while core.has_work():
        out = core.step()
        s = out.scheduler_stats
        metrics.observe_scheduler(s)
        for o in out.outputs:
            assert o.error is None
            events += 1
            tokens += len(o.new_token_ids)
            max_per_event = max(max_per_event, len(o.new_token_ids))
        drafts += s.spec_num_drafts
        draft_tokens += s.spec_num_draft_tokens
        accepted += s.spec_num_accepted_tokens
        for j, n in enumerate(s.spec_num_accepted_tokens_per_pos):
            per_pos[j] += n
    assert tokens == 48
    # Every step with drafts emitted its accepted drafts plus one token.
    assert tokens - events == accepted > 0
    assert max_per_event <= 4 and drafts <= events and accepted <= draft_tokens
    assert sum(per_pos) == accepted and per_pos[0] >= per_pos[1] >= per_pos[2]
    page = metrics.render().decode()
    assert f'vllm:spec_decode_num_drafts_total{{model_name="m"}} {float(drafts)}' in page
    assert (
        f'vllm:spec_decode_num_draft_tokens_total{{model_name="m"}} {float(draft_tokens)}' in page
    )
    assert f'vllm:spec_decode_num_accepted_tokens_total{{model_name="m"}} {float(accepted)}' in page
    line = 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="0"}'
    assert f"{line} {float(per_pos[0])}" in page
    pool = core.scheduler.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_usable_blocks
    core.shutdown()
