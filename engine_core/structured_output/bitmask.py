"""The model runner's side of structured outputs: the step's grammar bitmask on the logits."""

from __future__ import annotations

import collections
import functools
import importlib.util

import numpy as np
import torch

from engine_core.protocol import GrammarOutput


def apply_grammar_bitmask(
    logits: torch.Tensor, row_req_ids: list[str], grammar_output: GrammarOutput
) -> None:
    """Mask, in place, the logits rows of the structured requests to their allowed tokens.

    row_req_ids: the request of each logits row (a drafted request's rows are consecutive,
    one per position); the bitmask has a row for each of them, in the same order. Runs before
    any sampling transform, so penalties, temperature and top-k/top-p (and the rejection
    sampler) only ever see tokens the grammar allows.
    """
    import xgrammar as xgr

    first: dict[str, int] = {}
    for i, r in enumerate(row_req_ids):
        first.setdefault(r, i)
    count = collections.Counter(row_req_ids)
    indices = [first[r] + j for r in grammar_output.structured_req_ids for j in range(count[r])]
    if not indices:
        return
    words = np.frombuffer(grammar_output.grammar_bitmask, dtype=np.int32)
    assert words.size % len(indices) == 0, "one bitmask row per structured logits row"
    mask = torch.from_numpy(words.reshape(len(indices), -1).copy())  # torch wants it writable
    # xgrammar wants one mask row per logits row (indices: which logits rows they are).
    full = torch.full((logits.shape[0], mask.shape[1]), -1, dtype=torch.int32)
    full[indices] = mask
    xgr.apply_token_bitmask_inplace(
        logits,
        full.to(logits.device, non_blocking=True),
        indices=indices,
        backend=_backend(logits.device.type),
    )


@functools.cache
def _backend(device_type: str) -> str:
    """xgrammar's kernel: its CPU one; on CUDA its Triton one, or plain torch without Triton."""
    if device_type == "cpu":
        return "cpu"
    if device_type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch_native"
