"""The Sampler: turns one step's logits into one token per request, as vLLM V1's Sampler does.

Order of operations (vLLM V1's):
  1. logprobs, if any row asks: log_softmax of the RAW model logits. This is vLLM V1's default
     ``logprobs_mode="raw_logprobs"``: what a client sees is the model's own distribution, before
     logit bias, min_tokens masking, penalties, temperature, min-p, top-k and top-p.
  2. logit bias, then min_tokens masking (EOS and stop_token_ids set to -inf while a request has
     fewer than min_tokens outputs).
  3. penalties: repetition (tokens in prompt or output: positive logits divided, others
     multiplied), then frequency * count + presence * (count > 0) over output tokens, subtracted.
  4. greedy rows (temperature < 1e-5) take the argmax (lowest index on ties, as HF greedy).
  5. random rows: temperature, min-p, top-k and top-p (vLLM's order), then one draw from probs
     by inverting the cumulative distribution (exact, one uniform per row). Rows with a seed draw
     it from their own torch.Generator, so their tokens do not depend on the rest of the batch.

Each stage is skipped when no row needs it: an all-greedy batch without penalties, bias or
logprobs costs one argmax. The logits tensor is modified in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from engine_core.protocol import Logprobs, ModelRunnerOutput
from engine_core.sample.metadata import Penalties, SamplingMetadata
from engine_core.sample.rows import SamplingRows

# Top-p looks for its nucleus among a row's best 256 tokens, then 4096, and sorts the whole row
# only when the nucleus is larger still. On this 2-core CPU, for 32 rows of 49,152 logits:
# topk(256) 3.2 ms, topk(1024) 8.5 ms, topk(4096) 13 ms, a full sort 74 ms.
_TOP_P_WIDTHS = (256, 4096)


@dataclass(slots=True)
class SamplerOutput:
    """One step's sampled tokens and, for rows that asked, their logprobs."""

    token_ids: torch.Tensor  # [B] long
    logprobs: list[Logprobs | None]  # per row: None where params.logprobs is None


class Sampler:
    """Samples one token per row of a [B, V] float32 logits tensor (see the module docstring).

    One row per sampled position: with speculative decoding a request has a row per draft
    position plus one (rejection_sampler.py runs the same stages, then verifies the drafts).
    """

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        logits, raw_logprobs = self.process(logits, md)
        token_ids = _sample(logits, md)
        if raw_logprobs is None:
            return SamplerOutput(token_ids, [None] * md.num_rows)
        return SamplerOutput(token_ids, gather_logprobs(raw_logprobs, token_ids, md))

    def process(
        self, logits: torch.Tensor, md: SamplingMetadata
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stages 1-3 in place: (the float32 logits, raw logprobs of md.logprob_rows or None)."""
        if logits.dim() != 2 or tuple(logits.shape) != (md.num_rows, md.vocab_size):
            raise ValueError(
                f"logits must have shape ({md.num_rows}, {md.vocab_size}), got {tuple(logits.shape)}."
            )
        if logits.dtype != torch.float32:
            logits = logits.float()
        raw_logprobs = None
        if md.logprob_rows is not None:
            raw_logprobs = torch.log_softmax(logits[md.logprob_rows], dim=-1)
        if md.logit_bias is not None:
            rows, cols, values = md.logit_bias
            logits.index_put_((rows, cols), values, accumulate=True)
        if md.min_tokens_mask is not None:
            logits.index_put_(md.min_tokens_mask, torch.tensor(-math.inf, device=logits.device))
        if md.penalties is not None:
            _apply_penalties(logits, md.penalties)
        return logits, raw_logprobs


# ------------------------------------------------------------------------------ stages


def _apply_penalties(logits: torch.Tensor, pen: Penalties) -> None:
    x = logits[pen.rows]  # a view when every row has penalties, else a copy written back below
    if pen.seen is not None:
        # vLLM's rule: divide positive logits, multiply the others, for tokens seen anywhere.
        rep = torch.where(pen.seen, pen.repetition, 1.0)
        x.copy_(torch.where(x > 0, x / rep, x * rep))
    if pen.subtract is not None:
        x.sub_(pen.subtract)
    if not isinstance(pen.rows, slice):
        logits[pen.rows] = x


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax, the lowest index on ties ([B] long).

    Host fp32 logits take numpy's argmax, which vectorizes the scan where torch's CPU argmax
    does not: 32 rows of 49,152 logits, 0.28 against 2.35 ms on this 2-core CPU (a decode
    step's sampling at 32 rows was 3 ms, nearly all of it this argmax). Both return the first
    maximum, and the first NaN where a row has one.
    """
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2:
        return torch.from_numpy(logits.numpy().argmax(axis=-1).astype(np.int64, copy=False))
    return logits.argmax(dim=-1)


def _sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    if md.all_greedy:
        return argmax_rows(logits)
    # Greedy rows take their argmax before random rows are scaled (a copy unless all are random).
    greedy = None if isinstance(md.random_rows, slice) else argmax_rows(logits)
    x = warp_random_rows(logits, md)
    sampled = inverse_cdf(x, md.seeded, md.any_unseeded)
    if greedy is None:
        return sampled
    greedy[md.random_rows] = sampled
    return greedy


def warp_random_rows(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Stage 5 short of the draw: the random rows' logits after temperature, min-p, top-k and
    top-p (in place when every row is random, else a copy)."""
    x = logits[md.random_rows]
    if md.temperature is not None:
        x.div_(md.temperature)
    if md.min_p is not None:
        # p_i < min_p * p_max, in log space: no softmax needed.
        x.masked_fill_(x < x.amax(dim=-1, keepdim=True) + md.min_p.log(), -math.inf)
    if md.top_p is not None:
        _apply_top_k_top_p(x, md.top_k, md.max_top_k, md.top_p)
    elif md.top_k is not None:
        _apply_top_k(x, md.top_k, md.max_top_k)
    return x


def inverse_cdf(
    x: torch.Tensor, seeded: list[tuple[int, torch.Generator]], any_unseeded: bool
) -> torch.Tensor:
    """A sample of softmax(x) per row: the first token whose cumulative probability exceeds
    u * total, u ~ U[0, 1) (one draw per row, so a seeded row's stream advances by one).

    On this 2-core CPU, for 32 rows of 49,152 logits: 2.7 ms, where the exponential race
    (argmax(x - log E), V random numbers a row) took 12.7 ms. Masked tokens (-inf) have
    probability 0: the cumulative sum does not rise there, so `right=True` never lands on one;
    scaling u by the row's own total keeps fp32 rounding from pointing past the last token.
    """
    # The running sum in float64: in fp32 it drifts by up to ~1e-3 of the total over 49k
    # tokens, which would skew the odds of tokens late in the vocabulary. Unnormalized: u is
    # scaled by the row's total instead.
    cdf = (x - x.amax(dim=-1, keepdim=True)).exp_().cumsum(dim=-1, dtype=torch.float64)
    u = torch.empty(x.shape[0], 1, dtype=cdf.dtype, device=x.device)
    if any_unseeded:
        u.uniform_()
    for j, gen in seeded:
        u[j].uniform_(generator=gen)
    u.mul_(cdf[:, -1:])
    return torch.searchsorted(cdf, u, right=True).squeeze_(1).clamp_(max=x.shape[1] - 1)


def _apply_top_k(x: torch.Tensor, k: torch.Tensor, max_k: int) -> None:
    """Keep each row's k best logits (ties with the k-th kept, as vLLM); k = V keeps all."""
    vocab_size = x.shape[1]
    kth = x.topk(max_k, dim=-1).values.gather(1, (k.clamp(max=max_k) - 1)[:, None])
    kth.masked_fill_((k == vocab_size)[:, None], -math.inf)
    x.masked_fill_(x < kth, -math.inf)


def _apply_top_k_top_p(
    x: torch.Tensor, k: torch.Tensor | None, max_k: int, p: torch.Tensor
) -> None:
    """vLLM's top-k then top-p: keep a token while the mass of the tokens above it is below p.

    The nucleus is searched among each row's best tokens, widening (_TOP_P_WIDTHS, then a sort
    of the whole row) only for the rows whose nucleus may not fit.
    """
    num_rows, vocab_size = x.shape
    if k is None:
        k = torch.full((num_rows,), vocab_size, dtype=torch.long, device=x.device)
    full_lse = x.logsumexp(dim=-1, keepdim=True)
    threshold = torch.empty(num_rows, 1, dtype=x.dtype, device=x.device)
    pending = torch.arange(num_rows, device=x.device)
    widths = sorted({min(vocab_size, max(w, max_k)) for w in (*_TOP_P_WIDTHS, vocab_size)})
    for width in widths:
        rows = x if len(pending) == num_rows else x[pending]
        if width < vocab_size:
            vals = rows.topk(width, dim=-1).values
        else:
            vals = rows.sort(dim=-1, descending=True).values
        kp, pp = k[pending], p[pending]
        size = _nucleus_size(vals, kp, pp, full_lse[pending], vocab_size)
        threshold[pending] = vals.gather(1, (size - 1)[:, None])
        # A row without top-k whose candidates are all in the nucleus may have a larger one.
        overflow = (size == width) & (kp == vocab_size) & (pp < 1.0)
        if width == vocab_size or not bool(overflow.any()):
            break
        pending = pending[overflow]
    # Rows with neither top-k nor top-p keep everything.
    threshold.masked_fill_(((k == vocab_size) & (p == math.inf))[:, None], -math.inf)
    x.masked_fill_(x < threshold, -math.inf)


def _nucleus_size(
    vals: torch.Tensor, k: torch.Tensor, p: torch.Tensor, full_lse: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """How many of each row's best logits (vals, descending) survive top-k then top-p."""
    top_k_rows = (k < vocab_size)[:, None]
    kth = vals.gather(1, (k.clamp(max=vals.shape[1]) - 1)[:, None])
    kth.masked_fill_(~top_k_rows, -math.inf)
    vals = vals.masked_fill(vals < kth, -math.inf)
    # vLLM renormalizes over what top-k kept before top-p.
    lse = torch.where(top_k_rows, vals.logsumexp(dim=-1, keepdim=True), full_lse)
    probs = (vals - lse).exp_()
    mass_above = probs.cumsum(dim=-1).sub_(probs)
    keep = (mass_above < p[:, None]) & (vals > -math.inf)
    return keep.sum(dim=-1).clamp_(min=1)


# ------------------------------------------------------------------------------ logprobs


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, md: SamplingMetadata
) -> list[Logprobs | None]:
    """Per row: the sampled token's logprob and rank, then the top-N (vLLM's layout)."""
    sampled = token_ids[md.logprob_rows]
    sampled_lp = logprobs.gather(1, sampled[:, None])
    # 1-based rank: how many tokens are at least as likely as the sampled one.
    ranks = (logprobs >= sampled_lp).sum(dim=-1).tolist()
    top_n = max(md.num_logprobs)
    top_ids_l = top_lp_l = [[]] * len(ranks)
    if top_n:
        top_lp, top_ids = logprobs.topk(top_n, dim=-1)
        top_ids_l, top_lp_l = top_ids.tolist(), top_lp.tolist()
    sampled_l, sampled_lp_l = sampled.tolist(), sampled_lp.flatten().tolist()
    rows = range(md.num_rows) if isinstance(md.logprob_rows, slice) else md.logprob_rows.tolist()
    out: list[Logprobs | None] = [None] * md.num_rows
    for j, row in enumerate(rows):
        n = md.num_logprobs[j]
        out[row] = Logprobs(
            token_ids=[sampled_l[j], *top_ids_l[j][:n]],
            logprobs=[sampled_lp_l[j], *top_lp_l[j][:n]],
            sampled_rank=ranks[j],
        )
    return out


def sample_states(
    sampler: Sampler,
    logits: torch.Tensor,
    states: list,
    sampling_rows: SamplingRows,
    vocab_size: int,
    device: torch.device,
    eos_token_ids: list[int],
) -> ModelRunnerOutput:
    """The model runner's step without drafts: one logits row per sampled request (its
    InputBatch RequestState), sampled; each request's token."""
    metadata = SamplingMetadata.build(
        [s.sampling_params for s in states],
        [s.prompt_token_ids for s in states],
        [s.output_token_ids for s in states],
        [s.generator for s in states],
        vocab_size,
        device,
        eos_token_ids=eos_token_ids,
        sampling_rows=sampling_rows,
        batch_rows=np.fromiter((s.row for s in states), dtype=np.int64, count=len(states)),
    )
    out = sampler(logits, metadata)
    logprobs = out.logprobs if any(lp is not None for lp in out.logprobs) else None
    return ModelRunnerOutput(
        req_ids=[s.req_id for s in states],
        sampled_token_ids=out.token_ids.tolist(),
        logprobs=logprobs,
    )
