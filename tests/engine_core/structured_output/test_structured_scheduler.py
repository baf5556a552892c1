"""Structured outputs in the scheduler: compiles off the loop, bitmask rows, matchers, limits.

A real StructuredOutputManager (xgrammar, the default model's tokenizer) drives a Scheduler
with no model: the test plays the sampler, taking the lowest token the bitmask allows, so
every sampled token is one the grammar must accept.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal

import numpy as np
import pytest

from engine_core.config import EngineConfig
from engine_core.protocol import (
    FinishReason,
    ModelRunnerOutput,
    SamplingParams,
    StructuredOutputsParams,
)
from engine_core.sched.request import Request
from engine_core.sched.scheduler import Scheduler
from engine_core.structured_output.compile_process import CompileTimeout
from engine_core.structured_output.grammar import GrammarSpecError, check_spec
from engine_core.structured_output.manager import StructuredOutputManager
from frontend.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow  # xgrammar and the tokenizer take seconds to load

VOCAB = 49152
EOS = 2
# An enum that takes xgrammar far longer than 0.2 s to compile.
HUGE_ENUM = [f"item-{i}-{i * 7919 % 10007}" for i in range(12000)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def make_scheduler(timeout: float = 10.0) -> Scheduler:
    config = EngineConfig(max_num_seqs=8, structured_outputs_compile_timeout=timeout)
    sched = Scheduler(config, num_blocks=64, max_model_len=256)
    sched.structured_output = StructuredOutputManager(config, VOCAB)
    return sched


def request(rid: str, spec: StructuredOutputsParams | None, max_tokens: int = 40) -> Request:
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=spec)
    return Request(rid, [1, 5, 7, 9], sp, [EOS], 0.0, 16)


def allowed(mask_row: np.ndarray) -> np.ndarray:
    bits = np.unpackbits(mask_row.view(np.uint8), bitorder="little")[:VOCAB]
    return np.flatnonzero(bits)


def run(sched: Scheduler, max_steps: int = 100_000) -> dict:
    """Step until everything finished; sample the lowest allowed token (or 100 if free).

    (Lowest-first would write JSON whitespace forever: the JSON specs here allow none.)
    """
    finals: dict = {}
    tokens: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return {
                rid: (reason, tokens.get(rid, []), err) for rid, (reason, err) in finals.items()
            }
        so = sched.schedule()
        masks = {}
        grammar = sched.get_grammar_bitmask(so)
        if grammar is not None:
            words = np.frombuffer(grammar.grammar_bitmask, dtype=np.int32).reshape(
                len(grammar.structured_req_ids), -1
            )
            masks = dict(zip(grammar.structured_req_ids, words, strict=True))
        ids, toks = [], []
        for rid in so.num_scheduled_tokens:
            req = sched.requests[rid]
            if req.num_computed_tokens + so.num_scheduled_tokens[rid] < req.num_tokens:
                continue
            ids.append(rid)
            toks.append(int(allowed(masks[rid])[0]) if rid in masks else 100)
        out = sched.update_from_output(so, ModelRunnerOutput(req_ids=ids, sampled_token_ids=toks))
        for o in out:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                finals[o.request_id] = (o.finish_reason, o.error)
    raise AssertionError("requests did not finish")


def test_structured_rows_follow_their_grammar_and_stop(tokenizer):
    sched = make_scheduler()
    sched.add_request(request("choice", StructuredOutputsParams(choice=["yes", "no"])))
    sched.add_request(request("regex", StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}")))
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer", "enum": [3, 7]}},
        "required": ["a"],
        "additionalProperties": False,
    }
    sched.add_request(
        request(
            "json", StructuredOutputsParams(json=schema, disable_any_whitespace=True), max_tokens=60
        )
    )
    sched.add_request(request("plain", None, max_tokens=5))
    results = run(sched)
    assert results["plain"][0] == FinishReason.LENGTH
    assert len(results["plain"][1]) == 5
    texts = {}
    for rid in ("choice", "regex", "json"):
        reason, toks, err = results[rid]
        assert reason == FinishReason.STOP, (rid, err)
        texts[rid] = tokenizer.decode([t for t in toks if t != EOS])
    assert texts["choice"] in ("yes", "no")
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", texts["regex"]), texts["regex"]
    assert isinstance(json.loads(texts["json"])["a"], int)
    # every KV block back in the pool
    pool = sched.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_usable_blocks
    assert not sched.requests


def test_same_spec_compiles_once_and_is_cached():
    sched = make_scheduler()
    mgr = sched.structured_output
    spec = StructuredOutputsParams(regex="a+b")
    s1, s2 = mgr.grammar_for(spec), mgr.grammar_for(StructuredOutputsParams(regex="a+b"))
    assert s1._job is s2._job
    assert mgr.grammar_for(StructuredOutputsParams(regex="a+c"))._job is not s1._job


def test_slow_compile_fails_alone_and_others_finish():
    sched = make_scheduler(timeout=0.2)
    # Warm the vocabulary first (its build is not part of the time limit).
    sched.add_request(request("warm", StructuredOutputsParams(regex="x")))
    run(sched)
    huge_enum = {"type": "string", "enum": HUGE_ENUM}
    sched.add_request(request("slow", StructuredOutputsParams(json=huge_enum)))
    sched.add_request(request("plain", None, max_tokens=3))
    sched.add_request(request("quick", StructuredOutputsParams(choice=["ok"])))
    results = run(sched, max_steps=100_000)
    reason, _, err = results["slow"]
    assert reason == FinishReason.ERROR
    assert "time limit" in err and "0.2 s" in err
    assert results["plain"][0] == FinishReason.LENGTH
    assert results["quick"][0] == FinishReason.STOP
    pool = sched.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_usable_blocks


def test_a_timed_out_compile_is_killed_and_the_next_compiles_still_run(tokenizer):
    sched = make_scheduler(timeout=0.2)
    mgr = sched.structured_output
    try:
        sched.add_request(request("warm", StructuredOutputsParams(regex="x")))
        run(sched)
        slow_spec = StructuredOutputsParams(json={"type": "string", "enum": HUGE_ENUM})
        slow = mgr.grammar_for(slow_spec)
        concurrent.futures.wait([slow._future])  # done: the child was killed at the limit
        assert isinstance(slow._future.exception(), CompileTimeout)
        assert not slow.ready() and "time limit" in slow.error
        # Its child process was killed (not left compiling): SIGKILL, reaped.
        killed = [c for c in mgr._children if not c.alive]
        assert [c.proc.returncode for c in killed] == [-signal.SIGKILL]
        # The same schema again fails at once, from the cache: no second compile.
        again = mgr.grammar_for(slow_spec)
        assert again._job is slow._job and not again.ready() and "time limit" in again.error
        # A normal schema right after compiles, and its output is right.
        schema = {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]}
        spec = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        sched.add_request(request("next", spec))
        reason, toks, err = run(sched, max_steps=100_000)["next"]
        assert reason == FinishReason.STOP, err
        assert isinstance(json.loads(tokenizer.decode([t for t in toks if t != EOS]))["b"], bool)
    finally:
        mgr.shutdown()
    assert not mgr._children


def test_abort_while_compiling_leaves_nothing():
    sched = make_scheduler()
    sched.add_request(request("a", StructuredOutputsParams(regex="[a-z]{2,5}")))
    sched.finish_requests(["a"], FinishReason.ABORT)
    assert not sched.has_unfinished_requests() and not sched.requests


def test_drafts_get_a_bitmask_row_per_position_and_are_cut_where_the_grammar_refuses(
    tokenizer,
):
    sched = make_scheduler()
    mgr = sched.structured_output
    sched.add_request(request("c", StructuredOutputsParams(choice=["abc def"])))
    req = sched.requests["c"]
    so = sched.schedule()
    while not so.structured_req_ids:  # compiling
        so = sched.schedule()
    first, *rest = tokenizer.encode("abc def", add_special_tokens=False)
    assert rest, "the choice takes several tokens"
    mask = np.frombuffer(sched.get_grammar_bitmask(so).grammar_bitmask, np.int32)
    assert first in allowed(mask)
    sched.update_from_output(so, ModelRunnerOutput(req_ids=["c"], sampled_token_ids=[first]))
    # A refused draft cuts the drafts there; a draft that ends the grammar (EOS) is dropped.
    req.spec_token_ids = [*rest, EOS, 5]
    mgr.validate_drafts([req])
    assert req.spec_token_ids == rest
    req.spec_token_ids = [rest[0], 99, *rest[1:]]
    mgr.validate_drafts([req])
    assert req.spec_token_ids == rest[:1]
    req.spec_token_ids = list(rest)
    so = sched.schedule()
    assert so.scheduled_spec_decode_tokens == {"c": rest}
    assert so.structured_req_ids == ["c"]
    grammar = sched.get_grammar_bitmask(so)
    rows = np.frombuffer(grammar.grammar_bitmask, np.int32).reshape(len(rest) + 1, -1)
    for i, draft in enumerate(rest):  # row i: what the grammar allows after drafts[:i]
        assert draft in allowed(rows[i]) and EOS not in allowed(rows[i])
    assert list(allowed(rows[-1])) == [EOS]  # the bonus position: the choice is complete
    # The fill rolled the matcher back: the emitted tokens advance it from where it was.
    emitted = [*rest, EOS]
    out = ModelRunnerOutput(req_ids=["c"], sampled_token_ids=[rest[0]], emitted_token_ids=[emitted])
    (final,) = sched.update_from_output(so, out)
    assert final.new_token_ids == emitted and final.finish_reason == FinishReason.STOP
    assert tokenizer.decode([first, *rest]) == "abc def"


@pytest.mark.parametrize(
    "spec, param",
    [
        (StructuredOutputsParams(regex="[a-"), "structured_outputs.regex"),
        (StructuredOutputsParams(grammar="root ::= "), "structured_outputs.grammar"),
        (StructuredOutputsParams(json='{"type": "objekt"}'), "structured_outputs.json"),
        (
            StructuredOutputsParams(json={"type": "array", "uniqueItems": True}),
            "structured_outputs.json.uniqueItems",
        ),
    ],
)
def test_bad_specs_name_their_part(spec, param):
    with pytest.raises(GrammarSpecError) as e:
        check_spec(spec)
    assert e.value.param == param


def test_structural_tag_new_and_vllm_legacy_forms_convert():
    legacy = {
        "type": "structural_tag",
        "structures": [{"begin": "<f=add>", "schema": {"type": "object"}, "end": "</f>"}],
        "triggers": ["<f="],
    }
    check_spec(StructuredOutputsParams(structural_tag=json.dumps(legacy)))
    with pytest.raises(GrammarSpecError) as e:
        check_spec(StructuredOutputsParams(structural_tag='{"type": "structural_tag"}'))
    assert e.value.param == "structured_outputs.structural_tag"


def test_structured_outputs_params_want_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="non-empty"):
        StructuredOutputsParams(choice=[])
