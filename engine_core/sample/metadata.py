"""SamplingMetadata: one step's sampling parameters as batched tensors, one row per sampled position."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from engine_core.protocol import SamplingParams
from engine_core.sample.rows import GatheredRows, SamplingRows, to_tensor

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
        *,
        sampling_rows: SamplingRows | None = None,
        batch_rows: np.ndarray | None = None,
    ) -> SamplingMetadata:
        """Batch the requests' parameters; row i of the logits belongs to params[i].

        sampling_rows, batch_rows: the persistent batch's parameter rows and the batch row of
        each logits row (the model runner's path); None: rows built from params here.
        """
        n = len(params)
        if not len(prompt_token_ids) == len(output_token_ids) == len(generators) == n:
            raise ValueError(
                f"params, prompt_token_ids, output_token_ids and generators must have one entry "
                f"per row, got {n}, {len(prompt_token_ids)}, {len(output_token_ids)} and "
                f"{len(generators)}."
            )
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be at least 1, got {vocab_size}.")
        if sampling_rows is None:
            sampling_rows, batch_rows = SamplingRows.from_params(params), np.arange(n)
        elif batch_rows is None or len(batch_rows) != n:
            raise ValueError("batch_rows must give the batch row of each of the params.")
        g = sampling_rows.gather(np.asarray(batch_rows, dtype=np.int64), vocab_size)
        random_rows = g.random.tolist()
        seeded: list[tuple[int, torch.Generator]] = []
        for j in g.seeded.tolist():
            i = random_rows[j]
            gen = generators[i]
            if gen is None:
                raise ValueError(f"row {i} has seed={params[i].seed} but no torch.Generator.")
            seeded.append((j, gen))
        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias_values: list[float] = []
        for i in g.bias_rows.tolist():
            for token_id, value in params[i].logit_bias.items():
                bias_rows.append(i)
                bias_ids.append(_token_id(token_id, vocab_size, "logit_bias"))
                bias_values.append(value)
        mask_rows: list[int] = []
        mask_ids: list[int] = []
        for i in np.flatnonzero(g.min_tokens).tolist():
            sp = params[i]
            if len(output_token_ids[i]) < sp.min_tokens:
                stops = chain(sp.stop_token_ids or (), () if sp.ignore_eos else eos_token_ids or ())
                # A stop id outside the vocabulary can never be sampled: nothing to mask.
                for token_id in stops:
                    if 0 <= token_id < vocab_size:
                        mask_rows.append(i)
                        mask_ids.append(token_id)
        logprob_rows = np.flatnonzero(g.logprobs >= 0)
        num_logprobs = np.minimum(g.logprobs[logprob_rows], vocab_size).tolist()

        def tensor(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        num_random = len(random_rows)
        top_k_in_use = g.top_k[g.top_k < vocab_size]
        penalties = None
        if g.penalty_rows.size:
            penalties = _build_penalties(
                g,
                g.penalty_rows.tolist(),
                n,
                prompt_token_ids,
                output_token_ids,
                vocab_size,
                device,
            )
        return cls(
            num_rows=n,
            vocab_size=vocab_size,
            all_greedy=num_random == 0,
            random_rows=_rows(random_rows, n, device) if num_random else None,
            temperature=(
                to_tensor(g.temperature, device)[:, None] if (g.temperature != 1.0).any() else None
            ),
            min_p=to_tensor(g.min_p, device)[:, None] if g.min_p.any() else None,
            top_k=to_tensor(g.top_k, device) if top_k_in_use.size else None,
            max_top_k=int(top_k_in_use.max()) if top_k_in_use.size else 0,
            top_p=to_tensor(g.top_p, device) if (g.top_p != math.inf).any() else None,
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
            logprob_rows=_rows(logprob_rows.tolist(), n, device) if logprob_rows.size else None,
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
    g: GatheredRows,
    rows: list[int],
    num_rows: int,
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    vocab_size: int,
    device: torch.device | str,
) -> Penalties:
    shape = (len(rows), vocab_size)
    output = _flat_token_index(
        [output_token_ids[i] for i in rows], vocab_size, device, "output_token_ids"
    )

    def column(values: np.ndarray) -> torch.Tensor:
        return to_tensor(values[rows], device)[:, None]

    repetition = seen = None
    if (g.repetition[rows] != 1.0).any():
        prompt = _flat_token_index(
            [prompt_token_ids[i] for i in rows], vocab_size, device, "prompt_token_ids"
        )
        seen = torch.zeros(shape, dtype=torch.bool, device=device)
        seen.view(-1)[prompt] = True
        seen.view(-1)[output] = True
        repetition = column(g.repetition)
    subtract = None
    if (g.frequency[rows] != 0.0).any() or (g.presence[rows] != 0.0).any():
        counts = torch.zeros(shape, device=device)
        counts.view(-1).index_add_(0, output, torch.ones(output.shape, device=device))
        frequency = column(g.frequency)
        presence = column(g.presence)
        generated = counts > 0  # before counts is scaled in place
        subtract = counts.mul_(frequency).add_(presence * generated)
    return Penalties(_rows(rows, num_rows, device), seen, repetition, subtract)


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
