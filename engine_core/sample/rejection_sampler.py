"""The rejection sampler: verifies a step's draft tokens against the target model, losslessly.

A request with k drafts has k + 1 logits rows: row j is the target's distribution for the
token after the request's tokens plus drafts[:j]. Every row goes through the Sampler's stages
(logit bias, min_tokens, penalties, temperature, min-p, top-k, top-p) with its metadata row
built from the tokens before that position, exactly as a step without speculation would.

Every row's target token is the token a plain step would emit there: the argmax for a
greedy row, for a random row one uniform u and the inverse CDF of p (the Sampler's draw).
Drafts are accepted while each equals its row's target token; at the first mismatch the
target token is emitted; when all are accepted the last row's target token is the bonus.
For a point-mass draft d (n-gram and suffix drafts are) this is exact rejection sampling:
the draft is accepted with probability p(d), and on rejection the emitted token follows p
with d removed and renormalised (vLLM's rule with q = one-hot(d)); every emitted token
follows p. A seeded request draws its uniforms from its own generator, one per position,
and its generator is rewound to one draw per emitted token: its tokens are the ones it
gets without speculation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine_core.protocol import Logprobs, ModelRunnerOutput
from engine_core.sample.metadata import SamplingMetadata, rows_per_position
from engine_core.sample.rows import SamplingRows
from engine_core.sample.sampler import (
    Sampler,
    argmax_rows,
    gather_logprobs,
    inverse_cdf,
    warp_random_rows,
)


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
        target = argmax_rows(logits)  # the greedy rows' tokens at every position
        saved = [(gen, gen.get_state()) for _, gen in md.seeded]
        if not md.all_greedy:
            # Every position draws its token as a plain step would (one uniform, inverse CDF).
            target[md.random_rows] = inverse_cdf(
                warp_random_rows(logits, md), md.seeded, md.any_unseeded
            )
        accepted = target == drafts
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
        _rewind_seeded(saved, md, draft_token_ids, num_accepted)
        logprobs = _emitted_logprobs(raw_logprobs, target, md, draft_token_ids, num_accepted)
        return RejectionOutput(tokens, logprobs, [len(d) for d in draft_token_ids], num_accepted)


def _rewind_seeded(
    saved: list[tuple[torch.Generator, torch.Tensor]],
    md: SamplingMetadata,
    draft_token_ids: list[list[int]],
    num_accepted: list[int],
) -> None:
    """Leave each seeded request's generator where a plain step per emitted token would:
    rows past its first rejection drew uniforms that no emitted token used."""
    if not saved:
        return
    # The request (by row) each seeded row belongs to, and its emitted count.
    emitted_of_row = [
        a + 1 for d, a in zip(draft_token_ids, num_accepted, strict=True) for _ in (*d, -1)
    ]
    random_rows = (
        range(md.num_rows) if isinstance(md.random_rows, slice) else md.random_rows.tolist()
    )
    states: dict[int, tuple[torch.Generator, torch.Tensor, int]] = {}
    for (j, gen), (_, state) in zip(md.seeded, saved, strict=True):
        if id(gen) not in states:  # the first row of the request: the state before it
            states[id(gen)] = (gen, state, emitted_of_row[random_rows[j]])
    for gen, state, emitted in states.values():
        gen.set_state(state)
        scratch = torch.empty(emitted, 1, dtype=torch.float64, device=gen.device)
        for i in range(emitted):
            scratch[i].uniform_(generator=gen)


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
