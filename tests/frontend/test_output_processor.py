"""OutputProcessor: the RequestOutputs a user gets from the engine's per-step token outputs."""

from __future__ import annotations

import asyncio

import pytest

from engine_core.protocol import EngineCoreOutput, FinishReason, Logprobs, SamplingParams
from frontend.output_processor import OutputProcessor, ProcessedOutputs
from frontend.outputs import RequestOutput, RequestOutputKind

DELTA, CUMULATIVE, FINAL = (
    RequestOutputKind.DELTA,
    RequestOutputKind.CUMULATIVE,
    RequestOutputKind.FINAL_ONLY,
)
T0 = 1000.0  # arrival time; step k's outputs come at T0 + k


@pytest.fixture(scope="module")
def tok():
    from frontend.tokenizer import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture
def proc(tok) -> OutputProcessor:
    return OutputProcessor(tok)


@pytest.fixture
def prompt_ids(tok) -> list[int]:
    return tok.encode("Tell me something.", add_special_tokens=False)


def add(proc, prompt_ids, rid="r", kind=FINAL, queue=None, **params):
    return proc.add_request(rid, "prompt", prompt_ids, SamplingParams(**params), T0, kind, queue)


def run(proc, rid, ids, finish=FinishReason.LENGTH, stop_reason=None, start=1):
    """The engine emits `ids` one per step and finishes on the last; returns each step's result."""
    results = []
    for k, tid in enumerate(ids):
        last = k == len(ids) - 1
        o = EngineCoreOutput(rid, [tid], finish_reason=finish if last else None)
        if last:
            o.stop_reason = stop_reason
        results.append(proc.process_outputs([o], T0 + start + k))
    return results


def outputs_of(results: list[ProcessedOutputs]) -> list[RequestOutput]:
    return [ro for r in results for ro in r.request_outputs]


def test_final_only_gives_one_output_with_the_whole_text(proc, tok, prompt_ids):
    ids = tok.encode(" Sure: 日本 🎉 done", add_special_tokens=False)
    (core_req,) = add(proc, prompt_ids, max_tokens=len(ids))
    assert core_req.request_id == "r" and core_req.prompt_token_ids == prompt_ids
    (ro,) = outputs_of(run(proc, "r", ids))
    assert ro.finished and ro.request_id == "r" and ro.prompt == "prompt"
    (c,) = ro.outputs
    assert c.text == " Sure: 日本 🎉 done"
    assert c.token_ids == ids
    assert (c.finish_reason, c.stop_reason, c.finished()) == ("length", None, True)
    assert c.logprobs is None and c.cumulative_logprob is None
    m = ro.metrics
    assert (m.arrival_time, m.first_token_time, m.last_token_time) == (T0, T0 + 1, T0 + len(ids))
    assert m.finished_time == T0 + len(ids) and m.num_generation_tokens == len(ids)
    assert not proc.has_unfinished_requests()


def test_delta_outputs_carry_only_what_is_new(proc, tok, prompt_ids):
    ids = tok.encode(" 世界 and café", add_special_tokens=False)
    add(proc, prompt_ids, kind=DELTA)
    ros = outputs_of(run(proc, "r", ids))
    assert len(ros) == len(ids)
    assert [ro.outputs[0].token_ids for ro in ros] == [[i] for i in ids]
    assert "".join(ro.outputs[0].text for ro in ros) == " 世界 and café"
    assert not any("\ufffd" in ro.outputs[0].text for ro in ros)
    assert [ro.finished for ro in ros] == [False] * (len(ids) - 1) + [True]


def test_an_output_cut_inside_a_character_ends_as_decode_shows_it(proc, tok, prompt_ids):
    ids = tok.encode(" ok 🎉", add_special_tokens=False)[:-1]  # max_tokens hit mid-emoji
    add(proc, prompt_ids, kind=DELTA)
    ros = outputs_of(run(proc, "r", ids))
    assert "\ufffd" not in "".join(ro.outputs[0].text for ro in ros[:-1])
    assert "".join(ro.outputs[0].text for ro in ros) == tok.decode(ids) == " ok \ufffd"


def test_cumulative_outputs_carry_everything_so_far(proc, tok, prompt_ids):
    ids = tok.encode(" one two three", add_special_tokens=False)
    add(proc, prompt_ids, kind=CUMULATIVE)
    ros = outputs_of(run(proc, "r", ids))
    assert [ro.outputs[0].token_ids for ro in ros] == [ids[: k + 1] for k in range(len(ids))]
    assert [ro.outputs[0].text for ro in ros] == [tok.decode(ids[: k + 1]) for k in range(len(ids))]


def test_a_stop_string_spanning_tokens_cuts_the_text_and_aborts_the_request(proc, tok, prompt_ids):
    text = " The answer is 42. Thanks for asking."
    ids = tok.encode(text, add_special_tokens=False)
    stop = "is 42."
    assert len(tok.encode(stop, add_special_tokens=False)) > 1
    add(proc, prompt_ids, kind=DELTA, stop=[stop])
    results = run(proc, "r", ids)
    aborts = [r.reqs_to_abort for r in results]
    hit = next(k for k, a in enumerate(aborts) if a)
    assert aborts[hit] == ["r"] and not any(aborts[hit + 1 :])
    ros = outputs_of(results)
    assert ros[-1].finished and len(ros) == hit + 1  # the later engine outputs are ignored
    final = ros[-1].outputs[0]
    assert (final.finish_reason, final.stop_reason) == ("stop", stop)
    streamed = "".join(ro.outputs[0].text for ro in ros)
    assert streamed == " The answer "
    # No delta ever carried part of the stop string, and the tokens end with its last one.
    assert not any("is" in ro.outputs[0].text for ro in ros)
    sent_ids = [t for ro in ros for t in ro.outputs[0].token_ids]
    assert sent_ids == ids[: hit + 1]
    assert stop in tok.decode(sent_ids) and stop not in tok.decode(sent_ids[:-1])


def test_text_that_may_begin_a_stop_string_is_held_back_until_it_does_not(proc, tok, prompt_ids):
    ids = tok.encode(" Hello world war", add_special_tokens=False)
    add(proc, prompt_ids, kind=DELTA, stop=[" world peace"])
    ros = outputs_of(run(proc, "r", ids))
    texts = [ro.outputs[0].text for ro in ros]
    held = 0
    sent = ""
    for k, delta in enumerate(texts):
        sent += delta
        if tok.decode(ids[: k + 1]).endswith(" world"):
            held += 1
            assert sent == " Hello"  # " world" might be the start of " world peace"
    assert held == 1
    assert sent == " Hello world war"
    assert ros[-1].outputs[0].finish_reason == "length"


def test_include_stop_str_in_output_keeps_the_stop_string_and_nothing_after(proc, tok, prompt_ids):
    ids = tok.encode(" a, b; STOP c d", add_special_tokens=False)
    add(proc, prompt_ids, kind=CUMULATIVE, stop=["STOP", "zzz"], include_stop_str_in_output=True)
    results = run(proc, "r", ids)
    ros = outputs_of(results)
    assert ros[-1].outputs[0].text == " a, b; STOP"
    assert all(" c" not in ro.outputs[0].text for ro in ros)
    assert ros[-1].outputs[0].stop_reason == "STOP"
    assert sum(len(r.reqs_to_abort) for r in results) == 1


def test_a_stop_string_inside_one_token_drops_the_rest_of_that_token(proc, tok, prompt_ids):
    ids = tok.encode(" understanding", add_special_tokens=False)
    assert len(ids) == 1
    add(proc, prompt_ids, stop=["stand"])
    (ro,) = outputs_of(run(proc, "r", ids + ids))
    assert ro.outputs[0].text == " under"
    assert ro.outputs[0].token_ids == ids


def test_a_stop_string_in_a_multi_token_step_cuts_tokens_and_logprobs_there(proc, tok, prompt_ids):
    ids = tok.encode(" one END two three", add_special_tokens=False)
    end = len(tok.encode(" one END", add_special_tokens=False))
    add(proc, prompt_ids, stop=["END"], logprobs=0)
    lps = [Logprobs([t], [-1.0], sampled_rank=1) for t in ids]
    result = proc.process_outputs([EngineCoreOutput("r", ids, lps)], T0 + 1)
    (ro,) = result.request_outputs
    c = ro.outputs[0]
    assert (c.text, c.token_ids, len(c.logprobs)) == (" one ", ids[:end], end)
    assert c.cumulative_logprob == pytest.approx(-1.0 * end)
    assert result.reqs_to_abort == ["r"]


def test_a_stop_string_in_the_engines_last_output_needs_no_abort(proc, tok, prompt_ids):
    ids = tok.encode(" one END", add_special_tokens=False)
    add(proc, prompt_ids, stop=["END"])
    results = run(proc, "r", ids, finish=FinishReason.LENGTH)
    assert [r.reqs_to_abort for r in results] == [[]] * len(ids)
    (ro,) = outputs_of(results)
    assert (ro.outputs[0].text, ro.outputs[0].finish_reason) == (" one ", "stop")


def test_stop_strings_are_ignored_until_min_tokens(proc, tok, prompt_ids):
    ids = tok.encode(" x. y. z.", add_special_tokens=False)
    n_first = len(tok.encode(" x.", add_special_tokens=False))
    add(proc, prompt_ids, stop=["."], min_tokens=n_first + 1, max_tokens=len(ids))
    (ro,) = outputs_of(run(proc, "r", ids))
    assert ro.outputs[0].text == " x. y"


def test_eos_finishes_with_stop_and_its_text_is_left_out(proc, tok, prompt_ids):
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode(" Bye", add_special_tokens=False) + [eos]
    add(proc, prompt_ids, skip_special_tokens=False)
    (ro,) = outputs_of(run(proc, "r", ids, finish=FinishReason.STOP, stop_reason=eos))
    c = ro.outputs[0]
    assert (c.text, c.token_ids, c.finish_reason, c.stop_reason) == (" Bye", ids, "stop", eos)


def test_n_samples_fan_out_with_seeds_and_come_back_as_one_output(proc, tok, prompt_ids):
    core = add(proc, prompt_ids, rid="p", n=3, seed=7, temperature=0.8)
    assert [r.request_id for r in core] == ["0_p", "1_p", "2_p"]
    assert [r.sampling_params.seed for r in core] == [7, 8, 9]
    assert all(r.sampling_params.n == 1 and r.sampling_params.temperature == 0.8 for r in core)
    assert proc.get_num_unfinished_requests() == 1
    words = [tok.encode(w, add_special_tokens=False) for w in (" zero", " one", " two")]
    results = []
    for k in range(2):  # interleaved, as one engine step carries them all
        outs = [
            EngineCoreOutput(
                f"{i}_p", [words[i][0]], finish_reason=FinishReason.LENGTH if k else None
            )
            for i in (2, 0, 1)
        ]
        results.append(proc.process_outputs(outs, T0 + 1 + k))
    (ro,) = outputs_of(results)
    assert ro.finished and ro.request_id == "p"
    assert [c.index for c in ro.outputs] == [0, 1, 2]
    assert [c.token_ids for c in ro.outputs] == [[w[0]] * 2 for w in words]
    assert not proc.has_unfinished_requests()


def test_unseeded_samples_stay_unseeded_and_a_huge_seed_wraps(proc, prompt_ids):
    assert [r.sampling_params.seed for r in add(proc, prompt_ids, rid="a", n=2)] == [None, None]
    big = 2**64 - 1
    wrapped = [r.sampling_params.seed for r in add(proc, prompt_ids, rid="b", n=2, seed=big)]
    assert wrapped == [big, 0]


def test_delta_mode_with_n_samples_carries_only_the_samples_that_changed(proc, tok, prompt_ids):
    add(proc, prompt_ids, rid="p", kind=DELTA, n=2)
    a, b = (
        tok.encode(" yes", add_special_tokens=False)[0],
        tok.encode(" no", add_special_tokens=False)[0],
    )
    r1 = proc.process_outputs([EngineCoreOutput("1_p", [b])], T0 + 1)
    r2 = proc.process_outputs(
        [EngineCoreOutput("0_p", [a], finish_reason=FinishReason.LENGTH)], T0 + 2
    )
    r3 = proc.process_outputs(
        [EngineCoreOutput("1_p", [b], finish_reason=FinishReason.LENGTH)], T0 + 3
    )
    (o1,), (o2,), (o3,) = r1.request_outputs, r2.request_outputs, r3.request_outputs
    assert [(c.index, c.text, c.finish_reason) for c in o1.outputs] == [(1, " no", None)]
    assert [(c.index, c.text, c.finish_reason) for c in o2.outputs] == [(0, " yes", "length")]
    assert [(c.index, c.text, c.finish_reason) for c in o3.outputs] == [(1, " no", "length")]
    assert (o1.finished, o2.finished, o3.finished) == (False, False, True)


def test_bad_requests_are_refused_with_the_bad_value_named(proc, prompt_ids):
    add(proc, prompt_ids, rid="x", n=2)
    with pytest.raises(ValueError, match="'x' is already running"):
        add(proc, prompt_ids, rid="x")
    with pytest.raises(ValueError, match="'0_x'"):  # would clash with x's first sample
        add(proc, prompt_ids, rid="0_x")
    with pytest.raises(ValueError, match="prompt_token_ids must not be empty"):
        add(proc, [], rid="y")
    with pytest.raises(ValueError, match="stop strings must be non-empty.*''"):
        add(proc, prompt_ids, rid="y", stop=["ok", ""])
    with pytest.raises(TypeError, match="output_kind"):
        proc.add_request("y", None, prompt_ids, SamplingParams(), T0, "delta")
    with pytest.raises(TypeError, match="put_nowait"):
        add(proc, prompt_ids, rid="y", queue=[])
    assert proc.get_num_unfinished_requests() == 1


def test_abort_returns_engine_ids_and_tells_the_waiting_client(proc, tok, prompt_ids):
    q: asyncio.Queue = asyncio.Queue()
    add(proc, prompt_ids, rid="p", kind=DELTA, queue=q, n=2, stop=["never"])
    ids = tok.encode(" nev", add_special_tokens=False)
    proc.process_outputs([EngineCoreOutput("0_p", ids)], T0 + 1)
    assert q.get_nowait().outputs[0].text == " "  # "nev" may begin "never": held back
    assert proc.abort_requests(["p", "unknown"]) == ["0_p", "1_p"]
    final = q.get_nowait()
    assert final.finished
    assert [(c.index, c.text, c.finish_reason) for c in final.outputs] == [
        (0, "nev", "abort"),
        (1, "", "abort"),
    ]
    assert not proc.has_unfinished_requests()
    # The engine's outputs still in flight are dropped; aborting twice does nothing.
    assert proc.process_outputs([EngineCoreOutput("0_p", ids)], T0 + 2).request_outputs == []
    assert proc.abort_requests(["p"]) == []
    assert q.empty()


def test_fail_all_finishes_every_request_with_the_error(proc, prompt_ids):
    q: asyncio.Queue = asyncio.Queue()
    add(proc, prompt_ids, rid="a", kind=DELTA, queue=q)
    add(proc, prompt_ids, rid="b", kind=FINAL, n=2)
    outs = proc.fail_all("engine core died: CUDA error")
    assert sorted(o.request_id for o in outs) == ["a", "b"]
    for o in outs:
        assert o.finished and o.error == "engine core died: CUDA error"
        assert {c.finish_reason for c in o.outputs} == {"error"}
    assert q.get_nowait() is next(o for o in outs if o.request_id == "a")
    assert proc.get_num_unfinished_requests() == 0


def test_an_engine_error_is_passed_through(proc, tok, prompt_ids):
    add(proc, prompt_ids)
    out = EngineCoreOutput("r", [], finish_reason=FinishReason.ERROR, error="out of KV cache")
    (ro,) = proc.process_outputs([out], T0 + 1).request_outputs
    assert ro.error == "out of KV cache" and ro.outputs[0].finish_reason == "error"


def test_logprobs_become_dicts_with_the_sampled_token_first(proc, tok, prompt_ids):
    a, b, c = (tok.encode(w, add_special_tokens=False)[0] for w in (" cat", " dog", " 🎉"))
    add(proc, prompt_ids, kind=DELTA, logprobs=2)
    step1 = EngineCoreOutput("r", [b], [Logprobs([b, a, b], [-0.9, -0.5, -0.9], sampled_rank=2)])
    step2 = EngineCoreOutput(
        "r", [c], [Logprobs([c, a, b], [-3.0, -0.1, -0.2], sampled_rank=7)], FinishReason.LENGTH
    )
    (o1,) = proc.process_outputs([step1], T0 + 1).request_outputs
    (o2,) = proc.process_outputs([step2], T0 + 2).request_outputs
    (lp1,) = o1.outputs[0].logprobs
    assert list(lp1) == [b, a]  # the sampled token first, even though it is also in the top-k
    assert (lp1[b].logprob, lp1[b].rank, lp1[b].decoded_token) == (-0.9, 2, " dog")
    assert (lp1[a].rank, lp1[a].decoded_token) == (1, " cat")
    (lp2,) = o2.outputs[0].logprobs  # DELTA: only the new position
    assert list(lp2) == [c, a, b] and lp2[c].rank == 7
    assert [lp2[t].rank for t in (a, b)] == [1, 2]
    assert o1.outputs[0].cumulative_logprob == pytest.approx(-0.9)
    assert o2.outputs[0].cumulative_logprob == pytest.approx(-3.9)


def test_stats_report_token_counts_and_latencies(proc, tok, prompt_ids):
    ids = tok.encode(" a b c d", add_special_tokens=False)
    add(proc, prompt_ids, rid="r")
    add(proc, prompt_ids, rid="q")
    results = run(proc, "r", ids)
    it = results[0].iteration_stats
    assert (it.num_prompt_tokens, it.num_generation_tokens) == (len(prompt_ids), 1)
    assert it.time_to_first_tokens == [1.0] and it.inter_token_latencies == []
    assert all(r.iteration_stats.inter_token_latencies == [1.0] for r in results[1:])
    (fin,) = results[-1].iteration_stats.finished_requests
    n = len(ids)
    assert (fin.request_id, fin.finish_reason, fin.num_generation_tokens) == ("r", "length", n)
    assert (fin.e2e_latency, fin.time_to_first_token, fin.decode_time) == (n, 1.0, n - 1)
    assert fin.mean_time_per_output_token == pytest.approx(1.0)
    assert proc.num_prompt_tokens_total == len(prompt_ids)
    assert proc.num_generation_tokens_total == n
    # An abort is reported with the next step's stats.
    proc.abort_requests(["q"])
    (aborted,) = proc.process_outputs([], T0 + 99).iteration_stats.finished_requests
    assert (aborted.request_id, aborted.finish_reason, aborted.time_to_first_token) == (
        "q",
        "abort",
        None,
    )
