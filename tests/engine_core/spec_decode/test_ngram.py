"""The n-gram proposer: the longest suffix match in prompt + output, its next k tokens."""

import numpy as np

from engine_core.spec_decode.ngram import propose_ngram


def ngram(tokens, lo, hi, k):
    return propose_ngram(np.array(tokens, dtype=np.int64), lo, hi, k)


def test_the_longest_match_wins_and_proposes_what_followed_it():
    # Suffix [2, 3]: occurs at 1..2 (followed by 9) and 5..6 ([1, 2, 3] longer: at 4..6 -> 7).
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert ngram(tokens, 1, 3, 2) == [7, 8]
    # With at most 2 tokens of context the most recent [2, 3] is still at 5..6.
    assert ngram(tokens, 1, 2, 3) == [7, 8, 1]


def test_no_match_or_too_short_a_match_proposes_nothing():
    assert ngram([1, 2, 3, 4, 5], 1, 3, 3) == []
    assert ngram([5, 6, 1, 7, 8, 1], 2, 3, 3) == []  # only a 1-gram matches
    assert ngram([5, 6, 1, 7, 8, 1], 1, 3, 3) == [7, 8, 1]


def test_the_proposal_stops_at_the_end_of_the_sequence():
    assert ngram([4, 5, 4, 5, 4], 1, 2, 5) == [5, 4]


def test_matches_agree_with_a_brute_force_search():
    rng = np.random.default_rng(0)
    for _ in range(300):
        tokens = rng.integers(0, 4, size=int(rng.integers(2, 40))).tolist()
        lo, hi, k = int(rng.integers(1, 3)), int(rng.integers(3, 6)), int(rng.integers(1, 5))
        expected = []
        for n in range(min(hi, len(tokens) - 1), lo - 1, -1):
            suffix = tokens[-n:]
            starts = [i for i in range(len(tokens) - n) if tokens[i : i + n] == suffix]
            if starts:
                s = starts[-1]
                expected = tokens[s + n : s + n + k]
                break
        assert ngram(tokens, lo, hi, k) == expected, (tokens, lo, hi, k)
