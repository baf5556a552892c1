"""The cuda attention backend: paged attention through kernels_cuda.ops (NVRTC kernels).

Same cache layout and step layout as the native backend (common.py). The metadata here is
flat device tensors, built from the host arrays and moved to the device with one copy
(worker/staging.py), so a step costs no per-row Python or per-row launches:

  - every token: its position and its cache slot (-1: a padding token, written nowhere);
  - the D single-query ("decode") rows: block tables [D, W] int32 and context lengths [D],
    attended by ops.paged_attention_decode;
  - the multi-token ("prefill") rows: block tables, context lengths (cached prefix plus this
    chunk) and cu_seqlens_q over their packed queries, attended by ops.paged_attention_prefill.

On CPU tensors kernels_cuda.ops runs its torch references, so this backend also runs on a
CPU (slowly): tests use that to check it against the native backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine_core.attention import AttentionBackend
from engine_core.attention.common import StepInputs, StepLayout
from engine_core.models.ops import CUDA_OPS
from engine_core.worker.staging import PinnedStaging
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


class CudaBackend(AttentionBackend):
    """Paged attention in the kernels; a step's inputs reach the device in one copy."""

    name = "cuda"
    ops = CUDA_OPS

    def __init__(self, staging: PinnedStaging) -> None:
        self.staging = staging

    def prepare(
        self, input_ids: np.ndarray, layout: StepLayout, logits_indices: np.ndarray
    ) -> StepInputs:
        num_decode = layout.num_decode
        prefill_lens = layout.query_lens[num_decode:]
        cu_seqlens = np.zeros(len(prefill_lens) + 1, dtype=np.int64)
        np.cumsum(prefill_lens, out=cu_seqlens[1:])
        rows = len(layout.query_lens)
        dev = self.staging.stage(
            {
                "input_ids": (input_ids, torch.int64),
                "positions": (layout.positions, torch.int64),
                "slot_mapping": (layout.slot_mapping, torch.int64),
                "block_tables": (layout.block_tables[:rows], torch.int32),
                "context_lens": (layout.context_lens, torch.int32),
                "cu_seqlens_q": (cu_seqlens, torch.int32),
                "logits_indices": (logits_indices, torch.int64),
            }
        )
        tables, lens = dev["block_tables"], dev["context_lens"]
        decode_lens = layout.context_lens[:num_decode]
        meta = CudaAttentionMetadata(
            positions=dev["positions"],
            slot_mapping=dev["slot_mapping"],
            num_decode_tokens=num_decode,
            decode_block_tables=tables[:num_decode],
            decode_context_lens=lens[:num_decode],
            max_decode_context_len=int(decode_lens.max()) if num_decode else 0,
            prefill_block_tables=tables[num_decode:],
            prefill_context_lens=lens[num_decode:],
            prefill_cu_seqlens_q=dev["cu_seqlens_q"],
            max_prefill_query_len=int(prefill_lens.max()) if len(prefill_lens) else 0,
        )
        return StepInputs(dev["input_ids"], dev["logits_indices"], meta)

    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: CudaAttentionMetadata,
    ) -> None:
        ops.reshape_and_cache(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: CudaAttentionMetadata,
    ) -> torch.Tensor:
        num_tokens, num_heads, head_dim = q.shape
        scale = head_dim**-0.5
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
        d = meta.num_decode_tokens
        if d:
            ops.paged_attention_decode(
                out[:d],
                q[:d],
                kv_cache[0],
                kv_cache[1],
                meta.decode_block_tables,
                meta.decode_context_lens,
                scale,
                meta.max_decode_context_len,
            )
        if num_tokens > d:
            ops.paged_attention_prefill(
                out[d:],
                q[d:],
                kv_cache[0],
                kv_cache[1],
                meta.prefill_block_tables,
                meta.prefill_cu_seqlens_q,
                meta.prefill_context_lens,
                scale,
                meta.max_prefill_query_len,
            )
        return out.view(num_tokens, num_heads * head_dim)


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
