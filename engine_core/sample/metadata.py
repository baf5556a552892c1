"""SamplingMetadata: one step's sampling parameters as batched tensors, one row per sampled position."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain

import torch

from engine_core.protocol import SamplingParams

_SAMPLING_EPS = 1e-5  # below this temperature a request is greedy (vLLM's _SAMPLING_EPS)

Rows = slice | torch.Tensor  # which batch rows a stage touches: slice(None) when all of them


@dataclass(slots=True)
class Penalties:
    """Repetition, frequency and presence penalties for the rows that have any."""

    rows: Rows
    seen: torch.Tensor | None  # [P, V] bool: in prompt or output (None: no repetition penalty)
    repetition: torch.Tensor | None  # [P, 1]
    # [P, V]: frequency * count + presence * (count > 0) over output tokens (None: both zero)
    subtract: torch.Tensor | None


@dataclass(slots=True)
class SamplingMetadata:
    """One step's sampling parameters as batched tensors; None marks a stage no row needs."""

    num_rows: int
    vocab_size: int
    all_greedy: bool
    random_rows: Rows | None  # rows sampled at random (None: all greedy)
    temperature: torch.Tensor | None  # [R, 1] for random rows
    min_p: torch.Tensor | None  # [R, 1]
    top_k: torch.Tensor | None  # [R] long, vocab_size where off
    max_top_k: int  # largest top_k in use (0: none)
    top_p: torch.Tensor | None  # [R] float, inf where off
    seeded: list[tuple[int, torch.Generator]]  # (index among random rows, its generator)
    any_unseeded: bool
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, token ids, biases
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None  # rows, token ids
    penalties: Penalties | None
    logprob_rows: Rows | None
    num_logprobs: list[int]  # per logprob row: how many top tokens besides the sampled one

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device | str = "cpu",
        eos_token_ids: list[int] | None = None,
    ) -> SamplingMetadata:
        """Batch the requests' parameters; row i of the logits belongs to params[i]."""
        n = len(params)
        if not len(prompt_token_ids) == len(output_token_ids) == len(generators) == n:
            raise ValueError(
                f"params, prompt_token_ids, output_token_ids and generators must have one entry "
                f"per row, got {n}, {len(prompt_token_ids)}, {len(output_token_ids)} and "
                f"{len(generators)}."
            )
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be at least 1, got {vocab_size}.")
        random_rows: list[int] = []
        temps: list[float] = []
        min_ps: list[float] = []
        top_ks: list[int] = []
        top_ps: list[float] = []
        seeded: list[tuple[int, torch.Generator]] = []
        penalty_rows: list[int] = []
        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias_values: list[float] = []
        mask_rows: list[int] = []
        mask_ids: list[int] = []
        logprob_rows: list[int] = []
        num_logprobs: list[int] = []
        for i, sp in enumerate(params):
            if sp.temperature >= _SAMPLING_EPS:
                gen = generators[i]
                if gen is not None:
                    seeded.append((len(random_rows), gen))
                elif sp.seed is not None:
                    raise ValueError(f"row {i} has seed={sp.seed} but no torch.Generator.")
                random_rows.append(i)
                temps.append(sp.temperature)
                min_ps.append(sp.min_p)
                top_ks.append(sp.top_k if 0 < sp.top_k < vocab_size else vocab_size)
                top_ps.append(sp.top_p if sp.top_p < 1.0 else math.inf)
            if sp.repetition_penalty != 1.0 or sp.frequency_penalty or sp.presence_penalty:
                penalty_rows.append(i)
            if sp.logit_bias:
                for token_id, value in sp.logit_bias.items():
                    bias_rows.append(i)
                    bias_ids.append(_token_id(token_id, vocab_size, "logit_bias"))
                    bias_values.append(value)
            if sp.min_tokens and len(output_token_ids[i]) < sp.min_tokens:
                stops = chain(sp.stop_token_ids or (), () if sp.ignore_eos else eos_token_ids or ())
                # A stop id outside the vocabulary can never be sampled: nothing to mask.
                for token_id in stops:
                    if 0 <= token_id < vocab_size:
                        mask_rows.append(i)
                        mask_ids.append(token_id)
            if sp.logprobs is not None:
                logprob_rows.append(i)
                num_logprobs.append(min(sp.logprobs, vocab_size))

        def tensor(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        num_random = len(random_rows)
        top_k_in_use = [k for k in top_ks if k < vocab_size]
        penalties = None
        if penalty_rows:
            penalties = _build_penalties(
                params, penalty_rows, prompt_token_ids, output_token_ids, vocab_size, device
            )
        return cls(
            num_rows=n,
            vocab_size=vocab_size,
            all_greedy=num_random == 0,
            random_rows=_rows(random_rows, n, device) if num_random else None,
            temperature=tensor(temps)[:, None] if any(t != 1.0 for t in temps) else None,
            min_p=tensor(min_ps)[:, None] if any(min_ps) else None,
            top_k=tensor(top_ks, torch.long) if top_k_in_use else None,
            max_top_k=max(top_k_in_use, default=0),
            top_p=tensor(top_ps) if any(p != math.inf for p in top_ps) else None,
            seeded=seeded,
            any_unseeded=len(seeded) < num_random,
            logit_bias=(
                (tensor(bias_rows, torch.long), tensor(bias_ids, torch.long), tensor(bias_values))
                if bias_rows
                else None
            ),
            min_tokens_mask=(
                (tensor(mask_rows, torch.long), tensor(mask_ids, torch.long)) if mask_rows else None
            ),
            penalties=penalties,
            logprob_rows=_rows(logprob_rows, n, device) if logprob_rows else None,
            num_logprobs=num_logprobs,
        )


def _rows(rows: list[int], n: int, device: torch.device | str) -> Rows:
    # A slice indexes a view, so a stage that covers the whole batch copies nothing.
    return slice(None) if len(rows) == n else torch.tensor(rows, dtype=torch.long, device=device)


def _token_id(token_id: int, vocab_size: int, field: str) -> int:
    if not 0 <= token_id < vocab_size:
        raise ValueError(
            f"{field} token id {token_id} is outside the vocabulary [0, {vocab_size})."
        )
    return token_id


def _flat_token_index(
    token_ids: list[list[int]], vocab_size: int, device: torch.device | str, field: str
) -> torch.Tensor:
    """row * V + token for every token of every row: where it lands in a flat [rows, V] tensor."""
    flat = torch.tensor(list(chain.from_iterable(token_ids)), dtype=torch.long, device=device)
    if flat.numel() == 0:
        return flat
    if flat.min() < 0 or flat.max() >= vocab_size:
        _token_id(flat[(flat < 0) | (flat >= vocab_size)][0].item(), vocab_size, field)
    lengths = torch.tensor([len(t) for t in token_ids], device=device)
    rows = torch.repeat_interleave(torch.arange(len(token_ids), device=device), lengths)
    return rows * vocab_size + flat


def _build_penalties(
    params: list[SamplingParams],
    rows: list[int],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    vocab_size: int,
    device: torch.device | str,
) -> Penalties:
    shape = (len(rows), vocab_size)
    output = _flat_token_index(
        [output_token_ids[i] for i in rows], vocab_size, device, "output_token_ids"
    )

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)[:, None]

    repetition = seen = None
    if any(params[i].repetition_penalty != 1.0 for i in rows):
        prompt = _flat_token_index(
            [prompt_token_ids[i] for i in rows], vocab_size, device, "prompt_token_ids"
        )
        seen = torch.zeros(shape, dtype=torch.bool, device=device)
        seen.view(-1)[prompt] = True
        seen.view(-1)[output] = True
        repetition = column([params[i].repetition_penalty for i in rows])
    subtract = None
    if any(params[i].frequency_penalty or params[i].presence_penalty for i in rows):
        counts = torch.zeros(shape, device=device)
        counts.view(-1).index_add_(0, output, torch.ones(output.shape, device=device))
        frequency = column([params[i].frequency_penalty for i in rows])
        presence = column([params[i].presence_penalty for i in rows])
        generated = counts > 0  # before counts is scaled in place
        subtract = counts.mul_(frequency).add_(presence * generated)
    return Penalties(_rows(rows, len(params), device), seen, repetition, subtract)


def rows_per_position(
    params: list[SamplingParams],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    generators: list[torch.Generator | None],
    draft_token_ids: list[list[int]],
) -> tuple[list, list, list, list]:
    """SamplingMetadata.build's per-row lists with one row per sampled position.

    Request i gets len(draft_token_ids[i]) + 1 consecutive rows; row j sees the outputs it
    would have without speculation there (outputs + drafts[:j]), so that penalties and
    min_tokens apply at every position as in a plain step.
    """
    p_rows: list[SamplingParams] = []
    prompt_rows: list[list[int]] = []
    out_rows: list[list[int]] = []
    gen_rows: list[torch.Generator | None] = []
    for sp, prompt, out, gen, drafts in zip(
        params, prompt_token_ids, output_token_ids, generators, draft_token_ids, strict=True
    ):
        for j in range(len(drafts) + 1):
            p_rows.append(sp)
            prompt_rows.append(prompt)
            out_rows.append(out + drafts[:j] if j else out)
            gen_rows.append(gen)
    return p_rows, prompt_rows, out_rows, gen_rows
