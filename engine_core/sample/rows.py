"""SamplingRows: the persistent batch's sampling parameters, one preallocated row a request.

As vLLM's gpu_input_batch keeps temperature, top-p, top-k and penalties: a request's row is
written once when it joins the batch (a diff), and each step gathers the scheduled rows
with one fancy index per parameter instead of rebuilding Python lists from the requests.
What is sparse and request-sized (logit_bias dicts, stop ids for min_tokens, generators)
stays on the request and is visited only for the rows whose flags say they need it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from engine_core.protocol import SamplingParams

_SAMPLING_EPS = 1e-5  # below this temperature a request is greedy (vLLM's _SAMPLING_EPS)


class SamplingRows:
    """Per-row sampling parameters (numpy, host side) for up to max_rows requests."""

    def __init__(self, max_rows: int) -> None:
        self.temperature = np.ones(max_rows, dtype=np.float32)
        self.top_p = np.full(max_rows, math.inf, dtype=np.float32)  # inf: off
        self.top_k = np.zeros(max_rows, dtype=np.int64)  # 0: off
        self.min_p = np.zeros(max_rows, dtype=np.float32)
        self.repetition = np.ones(max_rows, dtype=np.float32)
        self.frequency = np.zeros(max_rows, dtype=np.float32)
        self.presence = np.zeros(max_rows, dtype=np.float32)
        self.min_tokens = np.zeros(max_rows, dtype=np.int64)
        self.logprobs = np.full(max_rows, -1, dtype=np.int64)  # -1: none
        self.has_bias = np.zeros(max_rows, dtype=bool)
        self.has_seed = np.zeros(max_rows, dtype=bool)

    @classmethod
    def from_params(cls, params: list[SamplingParams]) -> SamplingRows:
        rows = cls(max(len(params), 1))
        for i, sp in enumerate(params):
            rows.set(i, sp)
        return rows

    def set(self, row: int, sp: SamplingParams) -> None:
        """Write one request's parameters into its row (when it joins the batch)."""
        self.temperature[row] = sp.temperature
        self.top_p[row] = sp.top_p if sp.top_p < 1.0 else math.inf
        self.top_k[row] = max(sp.top_k, 0)
        self.min_p[row] = sp.min_p
        self.repetition[row] = sp.repetition_penalty
        self.frequency[row] = sp.frequency_penalty
        self.presence[row] = sp.presence_penalty
        self.min_tokens[row] = sp.min_tokens
        self.logprobs[row] = -1 if sp.logprobs is None else sp.logprobs
        self.has_bias[row] = bool(sp.logit_bias)
        self.has_seed[row] = sp.seed is not None

    def gather(self, rows: np.ndarray, vocab_size: int) -> GatheredRows:
        """The parameters of logits rows 0..len(rows)-1, row i from batch row rows[i]."""
        temperature = self.temperature[rows]
        random = np.flatnonzero(temperature >= _SAMPLING_EPS)
        r = rows[random]
        top_k = self.top_k[r]
        top_k = np.where((top_k > 0) & (top_k < vocab_size), top_k, vocab_size)
        rep, freq, pres = self.repetition[rows], self.frequency[rows], self.presence[rows]
        return GatheredRows(
            random=random,
            temperature=temperature[random],
            min_p=self.min_p[r],
            top_k=top_k,
            top_p=self.top_p[r],
            seeded=np.flatnonzero(self.has_seed[r]),
            penalty_rows=np.flatnonzero((rep != 1.0) | (freq != 0.0) | (pres != 0.0)),
            repetition=rep,
            frequency=freq,
            presence=pres,
            bias_rows=np.flatnonzero(self.has_bias[rows]),
            min_tokens=self.min_tokens[rows],
            logprobs=self.logprobs[rows],
        )


class GatheredRows:
    """One step's gathered parameter arrays (indices are logits rows)."""

    __slots__ = (
        "random",
        "temperature",
        "min_p",
        "top_k",
        "top_p",
        "seeded",
        "penalty_rows",
        "repetition",
        "frequency",
        "presence",
        "bias_rows",
        "min_tokens",
        "logprobs",
    )

    def __init__(self, **arrays: np.ndarray) -> None:
        for name, value in arrays.items():
            setattr(self, name, value)


def to_tensor(a: np.ndarray, device: torch.device | str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)
