"""The model runner's side of structured outputs: the step's grammar bitmask on the logits."""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch

from engine_core.protocol import SchedulerOutput


def apply_grammar_bitmask(
    logits: torch.Tensor, row_req_ids: list[str], scheduler_output: SchedulerOutput
) -> None:
    """Mask, in place, the logits rows of the structured requests to their allowed tokens.

    row_req_ids: the request of each logits row. Runs before any sampling transform, so
    penalties, temperature and top-k/top-p only ever see tokens the grammar allows.
    """
    import xgrammar as xgr

    so = scheduler_output
    if so.grammar_bitmask is None or not so.structured_req_ids:
        return
    words = np.frombuffer(so.grammar_bitmask, dtype=np.int32).copy()  # torch wants it writable
    mask = torch.from_numpy(words.reshape(len(so.structured_req_ids), -1))
    row_of = {r: i for i, r in enumerate(row_req_ids)}
    keep = [(row_of[r], i) for i, r in enumerate(so.structured_req_ids) if r in row_of]
    if not keep:
        return
    indices = [row for row, _ in keep]
    if len(keep) != len(so.structured_req_ids):
        mask = mask[[i for _, i in keep]]
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
