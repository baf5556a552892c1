"""The Sampler: what each sampling parameter does to the tokens a request gets."""

from __future__ import annotations

import math

import pytest
import torch

from engine_core.protocol import SamplingParams
from engine_core.sample import sampler as sampler_mod
from engine_core.sample.sampler import Sampler, SamplingMetadata

# Chi-square critical value for 3 degrees of freedom at p = 0.001.
_CHI2_DF3_P001 = 16.27


def run(
    logits: torch.Tensor,
    params: list[SamplingParams],
    *,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
    eos: list[int] | None = None,
):
    """Sample once; returns (output, the logits after in-place processing)."""
    n = len(params)
    md = SamplingMetadata.build(
        params,
        prompts or [[] for _ in range(n)],
        outputs or [[] for _ in range(n)],
        generators or [None] * n,
        vocab_size=logits.shape[1],
        eos_token_ids=eos,
    )
    processed = logits.clone()
    return Sampler()(processed, md), processed


def counts_of(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.bincount(token_ids, minlength=vocab_size).double()


def chi_square(observed: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ greedy


def test_greedy_rows_take_the_argmax_and_the_lowest_index_on_ties():
    torch.manual_seed(0)
    logits = torch.randn(6, 500)
    logits[2, 7] = logits[2, 300] = logits[2].max() + 1.0  # a tie: index 7 must win
    out, _ = run(logits, [SamplingParams(temperature=0.0)] * 6)
    assert out.token_ids.tolist() == logits.argmax(dim=-1).tolist()
    assert out.token_ids[2] == 7
    assert out.token_ids.dtype == torch.long
    assert out.logprobs == [None] * 6


def test_argmax_rows_is_torchs_argmax_on_ties_nan_views_and_half_precision():
    """The host fp32 path (numpy's scan) picks what torch's argmax picks: the first maximum,
    the first NaN of a row that has one, over a strided view too; other dtypes take torch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 300, generator=g)
    x[1, 7] = x[1, 250] = 50.0  # a tie: index 7
    x[2, 40] = x[2, 9] = float("nan")  # the first NaN: index 9
    x[3] = 0.0  # all equal: index 0
    for logits in (x, x[:, ::3], x.half(), x[:0]):
        got = sampler_mod.argmax_rows(logits)
        assert got.dtype == torch.int64
        assert torch.equal(got, logits.argmax(dim=-1))
    assert sampler_mod.argmax_rows(x)[1:4].tolist() == [7, 9, 0]


def test_greedy_rows_in_a_mixed_batch_still_take_the_argmax():
    torch.manual_seed(1)
    logits = torch.randn(8, 300)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.5, top_p=0.5) for i in range(8)]
    out, _ = run(logits, params)
    greedy = logits.argmax(dim=-1)
    assert out.token_ids[1::2].tolist() == greedy[1::2].tolist()


def test_an_all_greedy_batch_builds_no_optional_stage_and_leaves_logits_alone():
    params = [SamplingParams(temperature=0.0)] * 4
    md = SamplingMetadata.build(params, [[1, 2]] * 4, [[3]] * 4, [None] * 4, vocab_size=10)
    assert md.all_greedy
    assert (md.penalties, md.logit_bias, md.min_tokens_mask, md.logprob_rows) == (None,) * 4
    logits = torch.randn(4, 10)
    before = logits.clone()
    Sampler()(logits, md)
    assert torch.equal(logits, before)


def test_penalty_tensors_cover_only_the_rows_with_penalties():
    params = [SamplingParams(temperature=0.0)] * 3 + [SamplingParams(repetition_penalty=1.2)]
    md = SamplingMetadata.build(params, [[1]] * 4, [[2]] * 4, [None] * 4, vocab_size=10)
    assert md.penalties.seen.shape == (1, 10) and md.penalties.subtract is None
    assert md.penalties.seen[0].nonzero().flatten().tolist() == [1, 2]


def test_half_precision_logits_and_an_empty_batch_are_accepted():
    logits = torch.randn(3, 50).to(torch.bfloat16)
    out, _ = run(logits, [SamplingParams(temperature=0.0)] * 3)
    assert out.token_ids.tolist() == logits.float().argmax(dim=-1).tolist()
    out, _ = run(torch.zeros(0, 50), [])
    assert out.token_ids.tolist() == [] and out.logprobs == []


# ------------------------------------------------------------------------------ random


def test_temperature_scales_the_sampled_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    rows = 20_000
    for temperature in (0.5, 2.0):
        torch.manual_seed(1234)
        out, _ = run(logits.repeat(rows, 1), [SamplingParams(temperature=temperature)] * rows)
        observed = counts_of(out.token_ids, 4)
        assert chi_square(observed, torch.softmax(logits / temperature, -1)) < _CHI2_DF3_P001
        # The same counts are far from the unscaled distribution.
        assert chi_square(observed, torch.softmax(logits, -1)) > 100 * _CHI2_DF3_P001


def test_top_k_never_samples_outside_the_k_best_tokens():
    torch.manual_seed(2)
    logits = torch.randn(50).repeat(4000, 1)
    out, _ = run(logits, [SamplingParams(temperature=2.0, top_k=5)] * 4000)
    top5 = set(logits[0].topk(5).indices.tolist())
    assert set(out.token_ids.tolist()) == top5  # all of them, and nothing else


@pytest.mark.parametrize("top_k", [0, -1, 10_000])
def test_top_k_off_or_larger_than_the_vocabulary_keeps_every_token(top_k):
    logits = torch.zeros(3000, 8)
    torch.manual_seed(3)
    out, _ = run(logits, [SamplingParams(top_k=top_k)] * 3000)
    assert set(out.token_ids.tolist()) == set(range(8))


def test_top_p_never_samples_outside_the_nucleus():
    # probs 0.5, 0.3, 0.15, 0.05: top_p=0.75 keeps a token while the mass above it is < 0.75.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    torch.manual_seed(4)
    out, _ = run(logits.repeat(8000, 1), [SamplingParams(top_p=0.75)] * 8000)
    observed = counts_of(out.token_ids, 4)
    assert observed[2:].sum() == 0
    # Renormalized over the nucleus: 0.5 / 0.8 = 0.625.
    assert abs(observed[0] / observed.sum() - 0.625) < 0.02


def test_min_p_drops_tokens_below_min_p_times_the_top_probability():
    # threshold 0.2 * 0.5 = 0.1: tokens 0, 1 and 2 stay, token 3 (0.05) goes.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    torch.manual_seed(5)
    out, _ = run(logits.repeat(8000, 1), [SamplingParams(min_p=0.2)] * 8000)
    observed = counts_of(out.token_ids, 4)
    assert observed[3] == 0 and observed[2] > 0
    assert chi_square(observed[:3], torch.tensor([0.5, 0.3, 0.15]) / 0.95) < 13.82  # df 2


def vllm_top_k_top_p(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """vLLM V1's reference algorithm (full ascending sort), for comparison."""
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    top_k_mask = logits_sort.gather(1, (logits_sort.size(1) - k).unsqueeze(1))
    logits_sort.masked_fill_(logits_sort < top_k_mask, -math.inf)
    probs_sum = logits_sort.softmax(dim=-1).cumsum(dim=-1)
    top_p_mask = probs_sum <= 1 - p.unsqueeze(1)
    top_p_mask[:, -1] = False
    logits_sort.masked_fill_(top_p_mask, -math.inf)
    return logits_sort.scatter(dim=-1, index=logits_idx, src=logits_sort)


@pytest.mark.parametrize("widths", [(4,), (4, 64), (16, 256), (1024,), (256, 4096)])
def test_top_k_top_p_keeps_the_same_tokens_as_vllms_full_sort(monkeypatch, widths):
    # Narrow widths force the rows whose nucleus is larger onto the wider and full-sort paths.
    monkeypatch.setattr(sampler_mod, "_TOP_P_WIDTHS", widths)
    torch.manual_seed(6)
    vocab = 2000
    logits = torch.randn(12, vocab) * torch.tensor([0.2, 1.0, 3.0, 8.0]).repeat(3)[:, None]
    k = torch.tensor([vocab, vocab, vocab, vocab, 3, 50, 700, vocab, 1, 20, vocab, 400])
    p = torch.tensor([0.9, 0.5, 0.95, 0.3, 0.9, 1.0, 0.8, 1.0, 0.5, 0.99, 0.999, 1.0])
    expected = vllm_top_k_top_p(logits.clone(), k, p)
    got = logits.clone()
    top_k_in_use = [int(v) for v in k if v < vocab]
    sampler_mod._apply_top_k_top_p(got, k, max(top_k_in_use), p.masked_fill(p >= 1, math.inf))
    assert torch.equal(got.isinf(), expected.isinf())
    assert torch.equal(got[~got.isinf()], logits[~got.isinf()])


# ------------------------------------------------------------------------------ seeds


def seeded_tokens(position: int, others: list[SamplingParams], params: SamplingParams, steps=6):
    """The tokens a seed=42 request gets over several steps at a given place in a batch."""
    # The request's own logits, drawn apart: torch.randn's last 16 values depend on the
    # tensor's size, so a row of a larger draw would differ from the same row drawn alone.
    own = torch.randn(3000, generator=seeded(5))
    torch.manual_seed(99)
    step_logits = [torch.randn(len(others) + 1, 3000) for _ in range(steps)]
    batch = others[:position] + [params] + others[position:]
    gens = [seeded(7) if p.seed is not None else None for p in batch]
    gens[position] = seeded(42)
    tokens = []
    for logits in step_logits:
        # The request's own logits are the same at every step, whatever its row.
        logits[position] = own
        torch.manual_seed(len(tokens))  # the unseeded rows' shared draw differs per batch
        out, _ = run(logits, batch, generators=gens)
        tokens.append(int(out.token_ids[position]))
    return tokens


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(seed=42),
        SamplingParams(seed=42, temperature=0.8, top_p=0.9),
        SamplingParams(seed=42, top_k=30, min_p=0.01),
    ],
)
def test_a_seeded_request_gets_the_same_tokens_whatever_else_is_in_the_batch(params):
    alone = seeded_tokens(0, [], params)
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=2000),
        SamplingParams(seed=7, top_p=0.5),
        SamplingParams(temperature=0.5, min_p=0.3),
    ]
    assert seeded_tokens(2, others, params) == alone
    assert seeded_tokens(4, others, params) == alone
    assert len(set(alone)) > 1  # it does sample


def test_different_seeds_give_different_tokens():
    logits = torch.zeros(1, 1000)
    a, _ = run(logits, [SamplingParams(seed=1)], generators=[seeded(1)])
    b, _ = run(logits, [SamplingParams(seed=2)], generators=[seeded(2)])
    c, _ = run(logits, [SamplingParams(seed=1)], generators=[seeded(1)])
    assert a.token_ids[0] != b.token_ids[0]
    assert a.token_ids[0] == c.token_ids[0]


# ------------------------------------------------------------------------------ penalties


def test_penalties_change_logits_as_vllms_formulas_say():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5, -2.0, 1.0], [2.0, -1.0, 3.0, 0.5, -2.0, 1.0]])
    params = [
        SamplingParams(
            temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.3
        ),
        SamplingParams(temperature=0.0),  # no penalties: untouched
    ]
    prompts = [[0, 1], [0, 1]]
    outputs = [[1, 2, 2], [1, 2, 2]]
    out, processed = run(logits, params, prompts=prompts, outputs=outputs)
    # Repetition on prompt or output tokens {0, 1, 2}: positive / 2, negative * 2;
    # then output counts {1: 1, 2: 2}: - 0.5 * count - 0.3.
    expected = [2.0 / 2, -1.0 * 2 - 0.5 - 0.3, 3.0 / 2 - 0.5 * 2 - 0.3, 0.5, -2.0, 1.0]
    assert processed[0].tolist() == pytest.approx(expected)
    assert torch.equal(processed[1], logits[1])
    assert out.token_ids.tolist() == [0, 2]  # the penalties moved row 0's argmax


def test_presence_and_frequency_penalties_ignore_the_prompt():
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    params = [SamplingParams(temperature=0.0, presence_penalty=1.0, frequency_penalty=1.0)]
    _, processed = run(logits, params, prompts=[[0, 0, 0]], outputs=[[1]])
    assert processed[0].tolist() == [1.0, -1.0, 1.0]


def test_negative_presence_penalty_encourages_repetition():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    out, _ = run(logits, [SamplingParams(temperature=0.0, presence_penalty=-0.5)], outputs=[[1]])
    assert out.token_ids.tolist() == [1]


# ------------------------------------------------------------------------------ bias, min_tokens


def test_logit_bias_is_added_to_the_named_tokens():
    logits = torch.tensor([[3.0, 0.0, 1.0, 2.0], [3.0, 0.0, 1.0, 2.0]])
    params = [
        SamplingParams(temperature=0.0, logit_bias={1: 5.0, 0: -1.5}),
        SamplingParams(temperature=0.0),
    ]
    out, processed = run(logits, params)
    assert processed[0].tolist() == [1.5, 5.0, 1.0, 2.0]
    assert out.token_ids.tolist() == [1, 0]


def test_logit_bias_outside_the_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="logit_bias token id 9"):
        run(torch.zeros(1, 4), [SamplingParams(logit_bias={9: 1.0})])


def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0]])  # eos = 2 is the favourite, stop id 3 next
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[3])
    out, processed = run(logits, [params], outputs=[[1, 1]], eos=[2])
    assert out.token_ids.tolist() == [1]
    assert processed[0, 2] == -math.inf and processed[0, 3] == -math.inf
    # With three outputs the request may stop.
    out, processed = run(logits, [params], outputs=[[1, 1, 1]], eos=[2])
    assert out.token_ids.tolist() == [2]
    assert torch.equal(processed, logits)


def test_min_tokens_with_ignore_eos_masks_only_the_stop_tokens():
    # vLLM leaves EOS out of a request's stop set when it ignores EOS.
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0]])
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[3], ignore_eos=True)
    out, processed = run(logits, [params], outputs=[[]], eos=[2])
    assert out.token_ids.tolist() == [2]
    assert processed[0, 3] == -math.inf


def test_min_tokens_never_samples_eos_at_random():
    logits = torch.zeros(2000, 4)
    torch.manual_seed(7)
    out, _ = run(logits, [SamplingParams(min_tokens=1)] * 2000, eos=[0])
    assert 0 not in out.token_ids.tolist()


# ------------------------------------------------------------------------------ logprobs


def test_logprobs_are_the_raw_model_logprobs_with_the_top_n_in_order():
    torch.manual_seed(8)
    logits = torch.randn(4, 200)
    raw = torch.log_softmax(logits, dim=-1)
    params = [
        # Penalties and bias change what is sampled, not the reported (raw) logprobs.
        SamplingParams(temperature=0.0, logprobs=5, logit_bias={17: 50.0}, presence_penalty=1.0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, logprobs=0),
        SamplingParams(temperature=1.0, logprobs=3),
    ]
    out, _ = run(logits, params, outputs=[[3], [], [], []])
    assert out.logprobs[1] is None
    for row in (0, 2, 3):
        lp = out.logprobs[row]
        n = params[row].logprobs
        sampled = int(out.token_ids[row])
        top = raw[row].topk(n)
        assert lp.token_ids == [sampled, *top.indices.tolist()]
        assert lp.logprobs == pytest.approx([raw[row, sampled].item(), *top.values.tolist()])
        assert lp.logprobs[1:] == sorted(lp.logprobs[1:], reverse=True)
        assert lp.sampled_rank == int((raw[row] >= raw[row, sampled]).sum())
    assert out.token_ids[0] == 17
    assert out.logprobs[0].sampled_rank == int((raw[0] >= raw[0, 17]).sum()) > 1


def test_logprobs_of_a_greedy_token_have_rank_one():
    torch.manual_seed(9)
    logits = torch.randn(1, 100)
    out, _ = run(logits, [SamplingParams(temperature=0.0, logprobs=1)])
    lp = out.logprobs[0]
    assert lp.sampled_rank == 1 and lp.token_ids[0] == lp.token_ids[1]
    assert lp.logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1).max().item())


def test_more_logprobs_than_the_vocabulary_are_clamped():
    out, _ = run(torch.randn(1, 4), [SamplingParams(logprobs=20)])
    assert len(out.logprobs[0].token_ids) == 5
    assert sorted(out.logprobs[0].token_ids[1:]) == [0, 1, 2, 3]


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("repetition_penalty", float("inf")),
        ("logprobs", 21),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("n", 0),
        ("max_tokens", 0),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("stop_token_ids", [-1]),
        ("logit_bias", {1: 200.0}),
    ],
)
def test_invalid_sampling_params_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    SamplingParams(max_tokens=None, min_tokens=5)  # no limit: accepted


def test_a_seeded_random_row_without_a_generator_is_rejected():
    with pytest.raises(ValueError, match="seed=3"):
        run(torch.zeros(1, 4), [SamplingParams(seed=3)])


def test_metadata_with_mismatched_lengths_is_rejected():
    with pytest.raises(ValueError, match="one entry per row"):
        SamplingMetadata.build([SamplingParams()], [[]], [], [None], vocab_size=4)


def test_logits_of_the_wrong_shape_are_rejected():
    md = SamplingMetadata.build([SamplingParams()], [[]], [[]], [None], vocab_size=4)
    with pytest.raises(ValueError, match=r"logits must have shape \(1, 4\)"):
        Sampler()(torch.zeros(1, 5), md)


def test_output_tokens_outside_the_vocabulary_are_rejected_when_penalties_need_them():
    with pytest.raises(ValueError, match="output_token_ids token id 7"):
        run(torch.zeros(1, 4), [SamplingParams(presence_penalty=1.0)], outputs=[[7]])
