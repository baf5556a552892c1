"""The suffix proposer: frequency-weighted continuations from the request and past outputs."""

import pytest

from engine_core.protocol import FinishReason, SamplingParams
from engine_core.sched.request import Request
from engine_core.spec_decode.config import SpeculativeConfig
from engine_core.spec_decode.suffix import SuffixProposer, SuffixTree


def make_request(req_id, prompt, output=()):
    r = Request(req_id, list(prompt), SamplingParams(), [0], 0.0, 16)
    for t in output:
        r.append_output_token(t)
    return r


def proposer(**kw):
    return SuffixProposer(SpeculativeConfig.from_dict({"method": "suffix", **kw}))


def test_the_most_frequent_continuation_of_the_longest_match_is_proposed():
    p = proposer(suffix_decoding_min_token_prob=0.0)
    # After [5, 6]: 7 8 twice, 9 once; the draft follows the majority.
    r = make_request("a", [5, 6, 7, 8, 1, 5, 6, 9, 2, 5, 6, 7, 8, 3, 5, 6])
    assert p.propose(r, 2) == [7, 8]
    # Each draft's path probability: 7 follows [5, 6] in 2 of 3 cases, then 8 always.
    drafts, probs = p.propose_with_probs(r, 2)
    assert drafts == [7, 8] and probs == pytest.approx([2 / 3, 2 / 3])


def test_min_token_prob_stops_an_unlikely_draft_and_length_adapts_to_the_match():
    p = proposer(suffix_decoding_min_token_prob=0.5)
    r = make_request("a", [5, 6, 7, 1, 5, 6, 9, 2, 5, 6, 4, 3, 5, 6])
    assert p.propose(r, 4) == []  # three continuations of 1/3 each
    q = proposer(suffix_decoding_max_spec_factor=1.0)
    r = make_request("b", [1, 2, 3, 4, 5, 6, 9, 9, 6])  # match [6], one token long
    assert q.propose(r, 5) == [9]


def test_finished_outputs_feed_other_requests_proposals():
    p = proposer()
    done = make_request("old", [1, 2], [40, 41, 42, 43, 44, 45])
    done.finish(FinishReason.STOP)
    p.finish(done, completed=True)
    r = make_request("new", [7, 8], [40, 41, 42])
    assert p.propose(r, 3) == [43, 44, 45]
    # An aborted request's output is not learned from.
    q = proposer()
    q.finish(done, completed=False)
    assert q.propose(r, 3) == []


def test_evicted_outputs_leave_the_global_tree_empty():
    p = proposer(suffix_decoding_max_cached_requests=1)
    for i, out in enumerate(([3, 4, 5, 6], [7, 8, 9, 7, 8])):
        p.finish(make_request(str(i), [1], out), completed=True)
    tree = SuffixTree(p.depth)
    tree.add_sequence([7, 8, 9, 7, 8])

    def dump(node):
        return {t: (c.count, dump(c)) for t, c in (node.children or {}).items()}

    assert dump(p.global_tree.root) == dump(tree.root)
