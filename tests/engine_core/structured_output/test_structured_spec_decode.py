"""Structured requests with speculative drafts: greedy outputs equal those without drafts.

An EngineCore in this process on the default model, with and without ngram and suffix
speculation: the drafts of structured requests are verified (one bitmask row per draft
position, plus the bonus), the tokens are those of a run without drafts, every output still
follows its grammar, and every KV block is back in the pool.
"""

from __future__ import annotations

import json
import re

import pytest

from engine_core.config import EngineConfig
from engine_core.core import EngineCore
from engine_core.protocol import EngineCoreRequest, SamplingParams, StructuredOutputsParams
from frontend.tokenizer import load_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
RECORD = '{"name": "Ann Lee", "age": 31, "tags": ["red", "blue"]}'
REGEX = r"(ab|cd)+-[0-9]{2,6}"
CHOICES = ["alpha beta gamma", "alpha beta delta", "omega"]
# Repetitive prompts: the n-gram and suffix proposers find drafts in them.
CASES = [
    ("Copy this JSON exactly: " + RECORD + "\nCopy: ", StructuredOutputsParams(json=SCHEMA)),
    ("Repeat: abababcdcd-1234 abababcdcd-1234 abababcdcd-", StructuredOutputsParams(regex=REGEX)),
    ("alpha beta gamma, alpha beta gamma, alpha beta", StructuredOutputsParams(choice=CHOICES)),
    ("Copy: " + RECORD + "\n" + RECORD + "\n", StructuredOutputsParams(json_object=True)),
    ("1, 2, 3, 4, 1, 2, 3, 4, 1, 2,", None),  # a plain request in the same batch
]
CONFIG = dict(dtype="float32", max_num_seqs=8, max_num_batched_tokens=64)
SPEC = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4},
    "suffix": {"method": "suffix"},
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def generate(tokenizer, speculative_config=None, **extra) -> tuple[list[list[int]], list[int]]:
    """Every case's greedy tokens, and per case the steps where it emitted several tokens
    (accepted drafts)."""
    core = EngineCore(EngineConfig(speculative_config=speculative_config, **CONFIG, **extra))
    try:
        for i, (prompt, spec) in enumerate(CASES):
            params = SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=spec)
            ids = tokenizer.encode(prompt)
            core.add_request(EngineCoreRequest(str(i), ids, params))
        tokens: list[list[int]] = [[] for _ in CASES]
        multi = [0] * len(CASES)
        while core.has_work():
            for out in core.step().outputs:
                assert out.error is None, out.error
                tokens[int(out.request_id)] += out.new_token_ids
                multi[int(out.request_id)] += len(out.new_token_ids) > 1
        kv = core.scheduler.kv_cache_manager
        assert kv.num_free_blocks == kv.num_usable_blocks  # every block back in the pool
        assert not core.scheduler.requests
        return tokens, multi
    finally:
        core.shutdown()


@pytest.fixture(scope="module")
def baseline(tokenizer):
    tokens, _ = generate(tokenizer)
    return tokens


def assert_follow_their_grammars(tokenizer, tokens: list[list[int]]) -> None:
    eos = tokenizer.eos_token_id
    texts = [tokenizer.decode([t for t in toks if t != eos]) for toks in tokens]
    record = json.loads(texts[0])
    assert set(record) == {"name", "age", "tags"} and isinstance(record["age"], int)
    assert re.fullmatch(REGEX, texts[1]), texts[1]
    assert texts[2] in CHOICES
    assert isinstance(json.loads(texts[3]), dict)


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_structured_greedy_outputs_with_drafts_equal_those_without(tokenizer, baseline, method):
    assert_follow_their_grammars(tokenizer, baseline)
    tokens, multi = generate(tokenizer, SPEC[method])
    assert tokens == baseline
    # The JSON-schema and regex requests had drafts verified and kept (a choice ends in few
    # steps). The json_object request's output is not a copy of its prompt, so whether a
    # draft of it is kept depends on which steps it shares with the others, which depends on
    # when its grammar's compile (a child process) finishes: not asserted.
    assert multi[0] and multi[1], multi
    assert_follow_their_grammars(tokenizer, tokens)


def test_three_tensor_parallel_ranks_sample_structured_drafted_rows_as_one_does(
    tokenizer, baseline
):
    # The workers get each step's bitmask in a WorkerSample after its forward.
    ranks = dict(tensor_parallel_size=3, kv_cache_space_gib=0.05, max_model_len=512)
    tokens, multi = generate(tokenizer, SPEC["ngram"], **ranks)
    assert tokens == baseline
    assert multi[0] and multi[1], multi
