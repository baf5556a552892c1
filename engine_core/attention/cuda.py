"""Paged attention through kernels_cuda.ops: the CUDA path's metadata and the layer's call.

Same cache layout and row order as engine_core/attention/torch_paged.py (the CPU path): per layer a K
and a V pool [num_blocks, block_size, num_kv_heads, head_dim], single-query rows first. The
metadata here is flat device tensors, built from host arrays and moved to the device with
one copy (input_batch.PinnedStaging), so a step costs no per-row Python or per-row launches:

  - every token: its position and its cache slot (-1: a padding token, written nowhere);
  - the D single-query ("decode") rows: block tables [D, W] int32 and context lengths [D],
    attended by ops.paged_attention_decode;
  - the multi-token ("prefill") rows: block tables, context lengths (cached prefix plus this
    chunk) and cu_seqlens_q over their packed queries, attended by ops.paged_attention_prefill.

On CPU tensors kernels_cuda.ops runs its torch references, so this path also runs on a CPU
(slowly): tests use that to check the metadata against the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine_core.worker.input_batch import PinnedStaging
from kernels_cuda import ops


@dataclass(slots=True)
class CudaAttentionMetadata:
    """One step's attention inputs for the kernels, shared by every layer."""

    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64; -1 for a padding token
    num_decode_tokens: int  # the first D tokens (and rows) are single-query rows
    decode_block_tables: torch.Tensor  # [D, W] int32
    decode_context_lens: torch.Tensor  # [D] int32, this step's token included
    # A host-side bound on decode_context_lens: it sizes the decode kernel's split along the
    # sequence, so a CUDA graph fixes it at capture (None: W * block_size).
    max_decode_context_len: int | None
    prefill_block_tables: torch.Tensor  # [P, W] int32
    prefill_context_lens: torch.Tensor  # [P] int32: cached prefix + this chunk
    prefill_cu_seqlens_q: torch.Tensor  # [P + 1] int32, over the prefill tokens only
    max_prefill_query_len: int

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]


@dataclass(slots=True)
class KernelStep:
    """A step's device inputs for the kernel path."""

    input_ids: torch.Tensor  # [T] int64
    logits_indices: torch.Tensor  # [S] int64: the sampled rows' last token
    meta: CudaAttentionMetadata


def stage_step(
    staging: PinnedStaging,
    input_ids: np.ndarray,
    positions: np.ndarray,
    query_lens: np.ndarray,
    num_computed: np.ndarray,
    block_tables: np.ndarray,
    block_size: int,
    logits_indices: np.ndarray,
) -> KernelStep:
    """Build a step's metadata on the host and move everything with one copy.

    query_lens, num_computed: per row, single-query rows first; block_tables [rows, W] hold
    at least each row's ceil((num_computed + query_len) / block_size) blocks.
    """
    query_lens = np.asarray(query_lens, dtype=np.int64)
    num_computed = np.asarray(num_computed, dtype=np.int64)
    rows = len(query_lens)
    if len(num_computed) != rows or block_tables.shape[0] != rows:
        raise ValueError(
            f"query_lens, num_computed and block_tables need one entry per row, got {rows}, "
            f"{len(num_computed)} and {block_tables.shape[0]}."
        )
    multi = query_lens > 1
    num_decode = int(np.argmax(multi)) if multi.any() else rows
    if not multi[num_decode:].all():
        raise ValueError("single-query rows must come before multi-token rows.")
    context_lens = num_computed + query_lens
    prefill_lens = query_lens[num_decode:]
    cu_seqlens = np.zeros(len(prefill_lens) + 1, dtype=np.int64)
    np.cumsum(prefill_lens, out=cu_seqlens[1:])
    slots = slot_mapping(block_tables, query_lens, positions, block_size)
    dev = staging.stage(
        {
            "input_ids": (input_ids, torch.int64),
            "positions": (positions, torch.int64),
            "slot_mapping": (slots, torch.int64),
            "block_tables": (block_tables, torch.int32),
            "context_lens": (context_lens, torch.int32),
            "cu_seqlens_q": (cu_seqlens, torch.int32),
            "logits_indices": (logits_indices, torch.int64),
        }
    )
    tables, lens = dev["block_tables"], dev["context_lens"]
    meta = CudaAttentionMetadata(
        positions=dev["positions"],
        slot_mapping=dev["slot_mapping"],
        num_decode_tokens=num_decode,
        decode_block_tables=tables[:num_decode],
        decode_context_lens=lens[:num_decode],
        max_decode_context_len=int(context_lens[:num_decode].max()) if num_decode else 0,
        prefill_block_tables=tables[num_decode:],
        prefill_context_lens=lens[num_decode:],
        prefill_cu_seqlens_q=dev["cu_seqlens_q"],
        max_prefill_query_len=int(prefill_lens.max()) if len(prefill_lens) else 0,
    )
    return KernelStep(dev["input_ids"], dev["logits_indices"], meta)


def unsupported_by_kernels(
    dtype: torch.dtype, head_dim: int, hidden_size: int, intermediate_size: int
) -> str | None:
    """Why the CUDA kernels cannot run a model of these shapes (None: they can).

    The kernels store fp16/bf16 and read rows as 16-byte vectors; prefill tiles head_dim by 16.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA kernels take float16 or bfloat16, not {dtype}"
    if head_dim % 16 or head_dim > 256:
        return f"head_dim {head_dim} is not a multiple of 16 up to 256"
    if hidden_size % 8 or intermediate_size % 8:
        return f"hidden size {hidden_size} or MLP size {intermediate_size} is not a multiple of 8"
    return None


def slot_mapping(
    block_tables: np.ndarray, query_lens: np.ndarray, positions: np.ndarray, block_size: int
) -> np.ndarray:
    """Cache slot of every token of a flattened step: block_table[pos // bs] * bs + pos % bs."""
    row_of_token = np.repeat(np.arange(len(query_lens)), query_lens)
    slots = block_tables[row_of_token, positions // block_size].astype(np.int64) * block_size
    return slots + positions % block_size


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: CudaAttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write k, v [T, kv_heads, head_dim] to the cache, then attend q [T, heads, head_dim].

    Returns [T, heads * head_dim] in q's dtype. Every row's K/V is written before any row
    attends: a row may read blocks that another row of the same step fills.
    """
    ops.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    d = meta.num_decode_tokens
    if d:
        ops.paged_attention_decode(
            out[:d],
            q[:d],
            k_cache,
            v_cache,
            meta.decode_block_tables,
            meta.decode_context_lens,
            scale,
            meta.max_decode_context_len,
        )
    if num_tokens > d:
        ops.paged_attention_prefill(
            out[d:],
            q[d:],
            k_cache,
            v_cache,
            meta.prefill_block_tables,
            meta.prefill_cu_seqlens_q,
            meta.prefill_context_lens,
            scale,
            meta.max_prefill_query_len,
        )
    return out.view(num_tokens, num_heads * head_dim)
