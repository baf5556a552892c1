"""What both attention backends derive from a step's rows, written once.

A step is a flat batch of tokens over rows (requests), single-query ("decode") rows first,
then multi-token ("prefill") rows. Row i computes tokens [num_computed, num_computed +
query_len) of its sequence; token t of a sequence lives in cache slot
`block_table[t // block_size] * block_size + t % block_size`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(slots=True)
class StepLayout:
    """One step's rows on the host: the decode/prefill split and where every token goes."""

    query_lens: np.ndarray  # [rows] int64
    num_computed: np.ndarray  # [rows] int64: tokens before this step's, read from the cache
    context_lens: np.ndarray  # [rows] int64: num_computed + query_lens
    block_tables: np.ndarray  # [rows, W]: at least ceil(context_len / block_size) blocks each
    positions: np.ndarray  # [T] int64: each token's position in its sequence
    slot_mapping: np.ndarray  # [T] int64: each token's cache slot
    num_decode: int  # the first num_decode rows (and tokens) are single-query rows
    block_size: int

    @property
    def num_blocks(self) -> np.ndarray:
        """[rows]: the blocks each row's context covers."""
        return -(-self.context_lens // self.block_size)


@dataclass(slots=True)
class StepInputs:
    """One step's device inputs: what the model and the sampler read."""

    input_ids: torch.Tensor  # [T] int64
    logits_indices: torch.Tensor  # [S] int64: the sampled rows' last token in the batch
    meta: Any  # the attention backend's metadata, shared by every layer


def step_layout(
    query_lens: np.ndarray,
    num_computed: np.ndarray,
    block_tables: np.ndarray,
    block_size: int,
    positions: np.ndarray | None = None,
) -> StepLayout:
    """The layout of rows (query_lens, num_computed) over block_tables [rows, >= blocks].

    `positions` is token_positions(query_lens, num_computed) if the caller has it.
    """
    query_lens = np.asarray(query_lens, dtype=np.int64)
    num_computed = np.asarray(num_computed, dtype=np.int64)
    rows = len(query_lens)
    assert len(num_computed) == rows <= len(block_tables), "one entry per row"
    assert (query_lens >= 1).all(), f"every row needs a query token: {query_lens.tolist()}"
    multi = query_lens > 1
    num_decode = int(np.argmax(multi)) if multi.any() else rows
    assert multi[num_decode:].all(), "single-query rows must come before multi-token rows"
    context_lens = num_computed + query_lens
    assert (-(-context_lens // block_size) <= block_tables.shape[1]).all(), "block table short"
    if positions is None:
        positions = token_positions(query_lens, num_computed)
    return StepLayout(
        query_lens=query_lens,
        num_computed=num_computed,
        context_lens=context_lens,
        block_tables=block_tables,
        positions=positions,
        slot_mapping=slot_mapping(block_tables, query_lens, positions, block_size),
        num_decode=num_decode,
        block_size=block_size,
    )


def token_positions(query_lens: np.ndarray, num_computed: np.ndarray) -> np.ndarray:
    """Position of every token of a flattened step: row i covers [num_computed, +query_len)."""
    starts = np.cumsum(query_lens) - query_lens
    offsets = np.arange(int(query_lens.sum())) - np.repeat(starts, query_lens)
    return offsets + np.repeat(num_computed, query_lens)


def slot_mapping(
    block_tables: np.ndarray, query_lens: np.ndarray, positions: np.ndarray, block_size: int
) -> np.ndarray:
    """Cache slot of every token of a flattened step: block_table[pos // bs] * bs + pos % bs."""
    row_of_token = np.repeat(np.arange(len(query_lens)), query_lens)
    slots = block_tables[row_of_token, positions // block_size].astype(np.int64) * block_size
    return slots + positions % block_size
