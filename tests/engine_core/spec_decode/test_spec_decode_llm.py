"""Speculative decoding end to end through frontend.LLM: greedy outputs are the outputs
without it, token for token, whatever the batch, the budget, the KV pool or the stops do."""

from __future__ import annotations

import pytest

from engine_core.protocol import SamplingParams

# Several engines on the default model, one after another; a loaded 2-core machine is slow.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

NEW_TOKENS = 24
_QUOTE = (
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
    "def mul(a, b):\n    return a * b\n"
)
PROMPTS = [
    # Repetitive: the text to repeat is in the prompt.
    "Copy this code exactly:\n" + _QUOTE + "\nCopy:\n" + _QUOTE[:40],
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3,",
    # Not repetitive.
    "The capital of France is",
    "Write a haiku about the sea.",
    # A shared cached prefix with the first prompt (longer than a 64-token chunk).
    "Copy this code exactly:\n" + _QUOTE + "\nNow explain what mul does:",
]
# A small budget (chunked prefill of the long prompts) and a small KV pool (preemption).
ENGINE = dict(dtype="float32", max_num_batched_tokens=64, num_gpu_blocks_override=16)
NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 4,
}


def _greedy(**kw):
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, **kw)


def _tokens(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def assert_all_blocks_free(llm) -> None:
    stats = llm.get_stats()
    assert stats.num_running_reqs == 0 and stats.num_waiting_reqs == 0
    assert stats.num_free_blocks == stats.num_usable_blocks, stats


@pytest.fixture(scope="module")
def plain():
    from frontend import LLM

    with LLM(**ENGINE) as llm:
        yield llm


@pytest.fixture(scope="module", params=["ngram", "suffix"])
def spec(request):
    from frontend import LLM

    config = NGRAM if request.param == "ngram" else {"method": "suffix"}
    with LLM(speculative_config=config, **ENGINE) as llm:
        yield llm


@pytest.fixture(scope="module")
def baseline(plain):
    outs = plain.generate(PROMPTS, _greedy(), use_tqdm=False)
    return _tokens(outs), [o.outputs[0].text for o in outs]


def test_greedy_outputs_equal_the_outputs_without_speculation(spec, baseline):
    outs = spec.generate(PROMPTS, _greedy(), use_tqdm=False)
    assert _tokens(outs) == baseline[0]
    assert [o.outputs[0].text for o in outs] == baseline[1]
    assert_all_blocks_free(spec)
    # The prefix cache served the shared prefix and the engine still gives the same tokens.
    again = spec.generate(PROMPTS[::-1], _greedy(), use_tqdm=False)
    assert _tokens(again) == baseline[0][::-1]
    assert_all_blocks_free(spec)


def test_stops_and_max_tokens_inside_an_accepted_run_end_the_request_there(spec, plain, baseline):
    tokens, texts = baseline
    stop_token = tokens[0][15]
    stop_text = texts[1][10:16]
    cases = [
        (PROMPTS[0], _greedy(stop_token_ids=[stop_token])),
        (PROMPTS[1], _greedy(stop=[stop_text])),
        (PROMPTS[1], _greedy(stop=[stop_text], include_stop_str_in_output=True)),
        (PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)),
        (PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)),
    ]
    prompts = [c[0] for c in cases]
    params = [c[1] for c in cases]
    want = plain.generate(prompts, params, use_tqdm=False)
    got = spec.generate(prompts, params, use_tqdm=False)
    for w, g in zip(want, got, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].text == w.outputs[0].text
        assert g.outputs[0].finish_reason == w.outputs[0].finish_reason
    assert len(got[3].outputs[0].token_ids) == 7 and len(got[4].outputs[0].token_ids) == 13
    assert got[0].outputs[0].token_ids[-1] == stop_token
    assert_all_blocks_free(spec)


def test_n_2_and_logprobs_are_the_targets(spec, plain):
    params = SamplingParams(temperature=0.0, max_tokens=16, n=2, logprobs=2, ignore_eos=True)
    want = plain.generate(PROMPTS[:2], params, use_tqdm=False)
    got = spec.generate(PROMPTS[:2], params, use_tqdm=False)
    for w, g in zip(want, got, strict=True):
        assert len(g.outputs) == 2
        for wo, go in zip(w.outputs, g.outputs, strict=True):
            assert go.token_ids == wo.token_ids
            for wl, gl in zip(wo.logprobs, go.logprobs, strict=True):
                assert list(gl) == list(wl)
                for t in wl:
                    assert gl[t].logprob == pytest.approx(wl[t].logprob, abs=1e-4)
    assert_all_blocks_free(spec)


def test_a_seeded_sampled_request_gets_the_tokens_it_gets_without_speculation(spec, plain):
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, seed=7, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, max_tokens=16, seed=3, ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True),
    ]
    prompts = PROMPTS[:3]
    want = plain.generate(prompts, params, use_tqdm=False)
    got = spec.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got[:2]] == [o.outputs[0].token_ids for o in want[:2]]
    assert len(got[2].outputs[0].token_ids) == 16
    assert_all_blocks_free(spec)
