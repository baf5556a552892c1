"""The rejection sampler: greedy drafts verified exactly, sampled outputs keep the target's law."""

from __future__ import annotations

import torch

from engine_core.protocol import SamplingParams
from engine_core.sample.metadata import SamplingMetadata, rows_per_position
from engine_core.sample.rejection_sampler import RejectionSampler

# Chi-square critical values at p = 0.001, by degrees of freedom.
_CHI2_P001 = {2: 13.82, 3: 16.27}


def verify(logits, params, drafts, outputs=None, generators=None, eos=None):
    """Run the rejection sampler over requests' rows (logits: one row per position)."""
    n = len(params)
    rows = rows_per_position(
        params,
        [[] for _ in range(n)],
        outputs or [[] for _ in range(n)],
        generators or [None] * n,
        drafts,
    )
    md = SamplingMetadata.build(*rows, vocab_size=logits.shape[1], eos_token_ids=eos)
    return RejectionSampler()(logits.clone(), md, drafts)


def chi_square(observed: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs > 0
    assert observed[~keep].sum() == 0, "a token of probability 0 was emitted"
    expected = probs[keep].double() * observed.sum()
    return float(((observed[keep] - expected) ** 2 / expected).sum())


def test_greedy_accepts_matching_drafts_then_emits_the_target_token():
    logits = torch.full((4, 6), -1.0)
    logits[0, 2] = logits[1, 4] = logits[2, 1] = logits[3, 5] = 3.0  # argmaxes 2, 4, 1, 5
    greedy = SamplingParams(temperature=0.0)
    # All right: the three drafts and the bonus.
    out = verify(logits, [greedy], [[2, 4, 1]])
    assert out.token_ids == [[2, 4, 1, 5]] and out.num_accepted == [3] and out.num_drafts == [3]
    # Wrong at the second: the first draft, then the target's token there, nothing after.
    out = verify(logits, [greedy], [[2, 0, 1]])
    assert out.token_ids == [[2, 4]] and out.num_accepted == [1]
    # Wrong at once.
    out = verify(logits, [greedy], [[3, 4, 1]])
    assert out.token_ids == [[2]] and out.num_accepted == [0]


def test_requests_with_and_without_drafts_share_a_step():
    logits = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    greedy = SamplingParams(temperature=0.0)
    out = verify(logits, [greedy, greedy], [[1], []])
    assert out.token_ids == [[1, 0], [2]]
    assert out.num_drafts == [1, 0] and out.num_accepted == [1, 0]


def test_penalties_and_min_tokens_see_the_drafts_before_each_position():
    # Without the draft counted, row 1 would emit token 1 again; presence_penalty=2 makes it 0.
    logits = torch.tensor([[0.0, 3.0, 0.0], [2.0, 3.0, -5.0]])
    sp = SamplingParams(temperature=0.0, presence_penalty=2.0)
    assert verify(logits, [sp], [[1]]).token_ids == [[1, 0]]
    # min_tokens=2 masks EOS (token 0) at row 0 only (one output before row 1).
    eos_first = torch.tensor([[5.0, 1.0, 0.0], [5.0, 1.0, 0.0]])
    sp = SamplingParams(temperature=0.0, min_tokens=1)
    assert verify(eos_first, [sp], [[1]], eos=[0]).token_ids == [[1, 0]]


def test_logprobs_are_the_targets_raw_logprobs_of_each_emitted_token():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 4.0]])
    sp = SamplingParams(temperature=0.0, logprobs=1)
    out = verify(logits, [sp], [[1, 2]])
    assert out.token_ids == [[1, 0]]
    raw = torch.log_softmax(logits, -1)
    lps = out.logprobs[0]
    assert [lp.token_ids[0] for lp in lps] == [1, 0]
    assert torch.allclose(torch.tensor([lp.logprobs[0] for lp in lps]), raw[[0, 1], [1, 0]])


def _sampled_counts(row0, row1, draft, n, params):
    """Emit with one draft n times (as n requests): counts of the first and second token."""
    logits = torch.stack([row0, row1]).repeat(n, 1)
    out = verify(logits, [params] * n, [[draft]] * n)
    v = row0.shape[0]
    first = torch.bincount(torch.tensor([t[0] for t in out.token_ids]), minlength=v).double()
    second = [t[1] for t in out.token_ids if len(t) == 2]
    return first, torch.bincount(torch.tensor(second, dtype=torch.long), minlength=v).double(), out


def test_sampled_tokens_follow_the_target_with_always_wrong_drafts():
    torch.manual_seed(0)
    row0 = torch.tensor([1.0, 0.5, -float("inf"), 0.0])
    row1 = torch.tensor([0.0, 1.0, 2.0, 0.0])
    first, second, out = _sampled_counts(row0, row1, 2, 20_000, SamplingParams(temperature=1.0))
    assert sum(out.num_accepted) == 0 and second.sum() == 0
    assert chi_square(first, torch.softmax(row0, -1)) < _CHI2_P001[2]


def test_sampled_tokens_follow_the_target_with_always_right_drafts():
    torch.manual_seed(1)
    row0 = torch.tensor([-float("inf"), 0.0, -float("inf"), -float("inf")])  # p(draft 1) = 1
    row1 = torch.tensor([0.0, 1.0, 2.0, 0.5])
    first, second, out = _sampled_counts(row0, row1, 1, 20_000, SamplingParams(temperature=0.7))
    assert sum(out.num_accepted) == 20_000 and first[1] == 20_000
    assert chi_square(second, torch.softmax(row1 / 0.7, -1)) < _CHI2_P001[3]


def test_sampled_tokens_follow_the_target_with_mixed_drafts_and_top_k():
    torch.manual_seed(2)
    row0 = torch.tensor([1.0, 0.2, 0.0, -0.5])
    row1 = torch.tensor([0.3, 1.0, 2.0, -1.0])
    params = SamplingParams(temperature=1.0, top_k=3)
    n = 30_000
    # Draft 1 is sometimes right; the first token must still follow top-3 of row0 exactly.
    first, second, out = _sampled_counts(row0, row1, 1, n, params)
    p0 = torch.softmax(row0.masked_fill(row0 < 0.0, -float("inf")), -1)
    assert chi_square(first, p0) < _CHI2_P001[2]
    accept_rate = sum(out.num_accepted) / n
    assert abs(accept_rate - float(p0[1])) < 4 * (float(p0[1]) * (1 - float(p0[1])) / n) ** 0.5
    # After an accepted draft the bonus token follows top-3 of row1.
    p1 = torch.softmax(row1.masked_fill(row1 < 0.3, -float("inf")), -1)
    assert chi_square(second, p1) < _CHI2_P001[2]


def test_mixed_drafts_in_one_batch_keep_each_requests_distribution():
    torch.manual_seed(3)
    row0 = torch.tensor([0.5, 1.0, 0.0, 0.0])
    row1 = torch.tensor([0.0, 0.0, 1.0, 0.0])
    n = 12_000
    drafts = [[i % 4] for i in range(n)]  # every token as draft in turn, wrong or right
    logits = torch.stack([row0, row1]).repeat(n, 1)
    out = verify(logits, [SamplingParams(temperature=1.0)] * n, drafts)
    first = torch.bincount(torch.tensor([t[0] for t in out.token_ids]), minlength=4).double()
    assert chi_square(first, torch.softmax(row0, -1)) < _CHI2_P001[3]


def test_a_seeded_request_repeats_its_tokens():
    logits = torch.randn(3, 50)
    sp = SamplingParams(temperature=1.0, seed=5)
    runs = [
        verify(logits, [sp], [[7, 8]], generators=[torch.Generator().manual_seed(5)]).token_ids
        for _ in range(3)
    ]
    assert runs[0] == runs[1] == runs[2]


def test_a_seeded_request_emits_the_tokens_it_would_without_drafts():
    from engine_core.sample.sampler import Sampler

    torch.manual_seed(4)
    logits = torch.randn(3, 40) * 2
    sp = SamplingParams(temperature=1.0, top_k=10, seed=11)
    plain_gen = torch.Generator().manual_seed(11)
    plain = []
    for row in range(3):
        md = SamplingMetadata.build([sp], [[]], [plain], [plain_gen], vocab_size=40)
        plain.append(int(Sampler()(logits[row : row + 1].clone(), md).token_ids[0]))
    for drafts in ([plain[0], plain[1]], [plain[0], (plain[1] + 1) % 40], [(plain[0] + 1) % 40, 0]):
        gen = torch.Generator().manual_seed(11)
        out = verify(logits, [sp], [drafts], generators=[gen])
        emitted = out.token_ids[0]
        assert emitted == plain[: len(emitted)]
        # The generator stands where the plain steps' would after as many tokens.
        ref = torch.Generator().manual_seed(11)
        for _ in emitted:
            torch.empty(1, dtype=torch.float64).uniform_(generator=ref)
        assert torch.equal(gen.get_state(), ref.get_state())
