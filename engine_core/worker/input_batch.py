"""The persistent batch: per-request model-runner state in preallocated arrays, one row each.

A request keeps its row from the step it arrives until it finishes (or is preempted); each
step changes rows by diffs (new tokens, new blocks, progress) instead of rebuilding the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine_core.protocol import CachedRequestData, NewRequestData, SamplingParams
from engine_core.sample.rows import SamplingRows


@dataclass(slots=True)
class RequestState:
    """What the runner keeps per request besides its array rows (for the sampler)."""

    req_id: str
    row: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # grows as the scheduler reports sampled tokens
    sampling_params: SamplingParams
    generator: torch.Generator | None  # seeded requests draw from their own stream


class InputBatch:
    """Token ids, progress and block tables of up to max_num_reqs requests."""

    def __init__(
        self, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int, num_blocks: int
    ) -> None:
        self.max_num_reqs = max_num_reqs
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int64)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_computed_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int64)
        self.num_blocks_per_row = np.zeros(max_num_reqs, dtype=np.int64)
        self.requests: dict[str, RequestState] = {}
        # Sampling parameters per row, written when a request joins (sample/rows.py).
        self.sampling = SamplingRows(max_num_reqs)
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))  # pop() takes the lowest

    def __len__(self) -> int:
        return len(self.requests)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.requests

    def add_request(self, new: NewRequestData, device: torch.device | str = "cpu") -> RequestState:
        """Give a new (or resumed) request a row holding its prompt and outputs so far."""
        if new.req_id in self.requests:
            raise ValueError(f"request {new.req_id!r} is already in the batch.")
        if not self._free_rows:
            raise ValueError(f"the batch is full ({self.max_num_reqs} requests).")
        row = self._free_rows.pop()
        generator = None
        if new.sampling_params.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(new.sampling_params.seed % 2**64)
        state = RequestState(
            new.req_id,
            row,
            list(new.prompt_token_ids),
            list(new.output_token_ids),
            new.sampling_params,
            generator,
        )
        self.requests[new.req_id] = state
        self.sampling.set(row, new.sampling_params)
        self.num_tokens[row] = 0
        self.num_blocks_per_row[row] = 0
        try:
            self._append_tokens(state, new.prompt_token_ids)
            self._append_tokens(state, new.output_token_ids)
            self._append_blocks(state, new.block_ids)
            self._set_computed(state, new.num_computed_tokens)
        except ValueError:
            self.remove_request(new.req_id)
            raise
        return state

    def update_request(self, cached: CachedRequestData) -> RequestState:
        """Apply one step's diff: tokens sampled since last seen, new blocks, progress."""
        state = self.requests.get(cached.req_id)
        if state is None:
            raise ValueError(
                f"request {cached.req_id!r} is not in the batch (never added or dropped)."
            )
        self._append_tokens(state, cached.new_token_ids)
        state.output_token_ids.extend(cached.new_token_ids)
        if cached.num_dropped_blocks:
            num_blocks = int(self.num_blocks_per_row[state.row])
            if not 0 < cached.num_dropped_blocks <= num_blocks:
                raise ValueError(
                    f"request {cached.req_id!r}: cannot drop {cached.num_dropped_blocks} of its "
                    f"{num_blocks} blocks."
                )
            self.num_blocks_per_row[state.row] = num_blocks - cached.num_dropped_blocks
        self._append_blocks(state, cached.new_block_ids)
        self._set_computed(state, cached.num_computed_tokens)
        return state

    def remove_request(self, req_id: str) -> None:
        """Free a finished, aborted or preempted request's row (unknown ids are ignored)."""
        state = self.requests.pop(req_id, None)
        if state is not None:
            self._free_rows.append(state.row)
            self._free_rows.sort(reverse=True)

    def _append_tokens(self, state: RequestState, token_ids: list[int]) -> None:
        row, start = state.row, int(self.num_tokens[state.row])
        end = start + len(token_ids)
        if end > self.max_model_len:
            raise ValueError(
                f"request {state.req_id!r} would hold {end} tokens, more than max_model_len="
                f"{self.max_model_len}."
            )
        self.token_ids[row, start:end] = token_ids
        self.num_tokens[row] = end

    def _append_blocks(self, state: RequestState, block_ids: list[int]) -> None:
        row, start = state.row, int(self.num_blocks_per_row[state.row])
        end = start + len(block_ids)
        if end > self.block_table.shape[1]:
            raise ValueError(
                f"request {state.req_id!r} would hold {end} blocks, more than the "
                f"{self.block_table.shape[1]} a max_model_len sequence needs."
            )
        ids = np.asarray(block_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_blocks):
            bad = ids[(ids < 0) | (ids >= self.num_blocks)][0]
            raise ValueError(
                f"request {state.req_id!r}: block id {bad} is outside the KV cache "
                f"[0, {self.num_blocks})."
            )
        self.block_table[row, start:end] = ids
        self.num_blocks_per_row[row] = end

    def _set_computed(self, state: RequestState, num_computed: int) -> None:
        if not 0 <= num_computed <= self.num_tokens[state.row]:
            raise ValueError(
                f"request {state.req_id!r}: num_computed_tokens={num_computed} is outside "
                f"[0, {int(self.num_tokens[state.row])}]."
            )
        self.num_computed_tokens[state.row] = num_computed
