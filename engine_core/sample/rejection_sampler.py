"""The rejection sampler: verifies a step's draft tokens against the target model, losslessly.

A request with k drafts has k + 1 logits rows: row j is the target's distribution for the
token after the request's tokens plus drafts[:j]. Every row goes through the Sampler's stages
(logit bias, min_tokens, penalties, temperature, min-p, top-k, top-p) with its metadata row
built from the tokens before that position, exactly as a step without speculation would.

Greedy rows: accept drafts while each equals the target's argmax; at the first mismatch emit
the argmax; when every draft is accepted also emit the argmax of the last row (the bonus
token). Random rows (the draft is a point mass, as n-gram and suffix drafts are): accept
draft d with probability p(d); on rejection emit a sample of p with d removed and
renormalised, which makes the emitted token's distribution exactly p (vLLM's rule with
q = one-hot(d)); after k acceptances draw the bonus token from the last row. Seeded requests
draw their uniforms from their own generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from engine_core.protocol import Logprobs, ModelRunnerOutput
from engine_core.sample.metadata import SamplingMetadata, rows_per_position
from engine_core.sample.rows import SamplingRows
from engine_core.sample.sampler import Sampler, gather_logprobs, inverse_cdf, warp_random_rows


@dataclass(slots=True)
class RejectionOutput:
    """Per request: the tokens it emits this step (accepted drafts, then one target token)."""

    token_ids: list[list[int]]
    logprobs: list[list[Logprobs] | None]  # per request: one per emitted token, or None
    num_drafts: list[int]  # drafts verified per request
    num_accepted: list[int]  # of them accepted


class RejectionSampler:
    """Runs the Sampler's stages over every position, then verifies the drafts."""

    def __init__(self, sampler: Sampler | None = None) -> None:
        self.sampler = sampler or Sampler()

    def __call__(
        self, logits: torch.Tensor, md: SamplingMetadata, draft_token_ids: list[list[int]]
    ) -> RejectionOutput:
        """logits [sum(k_i + 1), V]: request i's rows are consecutive, its k_i drafts given."""
        num_rows = sum(len(d) + 1 for d in draft_token_ids)
        if num_rows != md.num_rows:
            raise ValueError(
                f"{len(draft_token_ids)} requests with {num_rows - len(draft_token_ids)} drafts "
                f"need {num_rows} metadata rows, got {md.num_rows}."
            )
        logits, raw_logprobs = self.sampler.process(logits, md)
        device = logits.device
        # drafts[r]: the draft verified at row r, -1 at a request's last row (the bonus).
        drafts_l = [t for d in draft_token_ids for t in (*d, -1)]
        drafts = torch.tensor(drafts_l, dtype=torch.long, device=device)
        target = logits.argmax(dim=-1)  # the greedy rows' answer at every position
        accepted = target == drafts
        if not md.all_greedy:
            rows = md.random_rows
            x = warp_random_rows(logits, md)
            d = drafts[rows]
            has_draft = d >= 0
            safe = d.clamp(min=0)[:, None]
            p_draft = (x.gather(1, safe) - x.logsumexp(dim=-1, keepdim=True)).exp_().squeeze_(1)
            u = _uniforms(x.shape[0], md, device)
            accept = has_draft & (u < p_draft)
            # The recovered token: p without the draft, renormalised (the bonus rows: p itself).
            x.scatter_(1, safe, torch.where(has_draft[:, None], -math.inf, x.gather(1, safe)))
            recovered = inverse_cdf(x, md.seeded, md.any_unseeded)
            target[rows] = torch.where(accept, d, recovered)
            accepted[rows] = accept
        target_l, accepted_l = target.tolist(), accepted.tolist()
        tokens: list[list[int]] = []
        emitted_rows: list[int] = []
        num_accepted: list[int] = []
        start = 0
        for d in draft_token_ids:
            a = 0
            while a < len(d) and accepted_l[start + a]:
                a += 1
            # Accepted rows emit their draft (== target there), the next row its target token.
            tokens.append(target_l[start : start + a + 1])
            emitted_rows.extend(range(start, start + a + 1))
            num_accepted.append(a)
            start += len(d) + 1
        logprobs = _emitted_logprobs(raw_logprobs, target, md, draft_token_ids, num_accepted)
        return RejectionOutput(tokens, logprobs, [len(d) for d in draft_token_ids], num_accepted)


def _uniforms(n: int, md: SamplingMetadata, device: torch.device) -> torch.Tensor:
    """One U[0, 1) per random row, from the row's generator where it has one."""
    u = torch.empty(n, dtype=torch.float32, device=device)
    if md.any_unseeded:
        u.uniform_()
    for j, gen in md.seeded:
        u[j].uniform_(generator=gen)
    return u


def _emitted_logprobs(
    raw_logprobs: torch.Tensor | None,
    target: torch.Tensor,
    md: SamplingMetadata,
    draft_token_ids: list[list[int]],
    num_accepted: list[int],
) -> list[list[Logprobs] | None]:
    """The target's raw logprobs of each emitted token (rows past the first rejection: none)."""
    if raw_logprobs is None:
        return [None] * len(draft_token_ids)
    per_row = gather_logprobs(raw_logprobs, target, md)
    out: list[list[Logprobs] | None] = []
    start = 0
    for d, a in zip(draft_token_ids, num_accepted, strict=True):
        rows = per_row[start : start + a + 1]
        out.append(None if rows[0] is None else [lp for lp in rows if lp is not None])
        start += len(d) + 1
    return out


def verify_drafts(
    rejection_sampler: RejectionSampler,
    logits: torch.Tensor,
    states: list,
    drafts: list[list[int]],
    sampling_rows: SamplingRows,
    vocab_size: int,
    device: torch.device,
    eos_token_ids: list[int],
) -> ModelRunnerOutput:
    """The model runner's step with drafts: logits [sum(k_i + 1), V] of the sampled requests
    (their InputBatch RequestStates), verified; every token each request emits."""
    rows = rows_per_position(
        [s.sampling_params for s in states],
        [s.prompt_token_ids for s in states],
        [s.output_token_ids for s in states],
        [s.generator for s in states],
        drafts,
    )
    metadata = SamplingMetadata.build(
        *rows,
        vocab_size,
        device,
        eos_token_ids=eos_token_ids,
        sampling_rows=sampling_rows,
        batch_rows=np.repeat([s.row for s in states], [len(d) + 1 for d in drafts]),
    )
    out = rejection_sampler(logits, metadata, drafts)
    any_lp = any(lp is not None for lp in out.logprobs)
    return ModelRunnerOutput(
        req_ids=[s.req_id for s in states],
        sampled_token_ids=[t[0] for t in out.token_ids],
        logprobs=[lp[0] if lp else None for lp in out.logprobs] if any_lp else None,
        emitted_token_ids=out.token_ids,
        emitted_logprobs=out.logprobs if any_lp else None,
    )
