"""The native attention backend: torch code over the paged KV cache (CPU, and the oracle).

A step's decode rows are batched in groups of DECODE_GROUP_SIZE: K/V gathered through the
group's block tables padded to its longest row, then one masked softmax attention (SDPA)
for the group. A short multi-token row after a cached context (a verify row of drafts)
joins them as one single-query row per token (SHORT_ROW_MAX_PAIRS). Other prefill rows go
one at a time: causal attention over [0, num_computed +
query_len), the first num_computed tokens (a cached prefix or earlier chunks) read from the
cache. The layout (row order, slots) is common.py's.

Math runs in the query's dtype; on a CPU that is fp32 (see models/loader.py). The CPU cache
is fp32, or bf16 beside a quantized model's bf16 matmuls. kernels_cpu's kernels read it in
place, widened as they go: the decode attention, and on AVX-512 CPUs a flash attention for
prefill rows; elsewhere prefill rows gather it for SDPA.
Gathers use index_select, much faster here than advanced indexing (`cache[block_tables]`).
docs/architecture.md has the measurements behind these choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine_core.attention import AttentionBackend
from engine_core.attention.common import StepInputs, StepLayout, step_layout
from engine_core.models.ops import NATIVE_OPS
from kernels_cpu import ops as cpu_ops

# Decode rows attended together. Rows come sorted by length, so small groups pad little and
# a group's gathered K/V stays in the CPU's cache.
DECODE_GROUP_SIZE = 8
# A multi-token row after a cached context with at most SHORT_ROW_MAX_QUERIES queries (a
# verify row of 1 + up to 32 drafts, a short chunk) and at most SHORT_ROW_MAX_PAIRS (query,
# key) pairs is attended as that many single-query rows, query i over the context's first
# num_computed + i + 1 keys: the paged decode kernel reads the blocks in place, where the
# prefill path gathers the whole context into a copy and runs SDPA, and the step stays a
# pure single-query step, which runs its decoder layers in one call (models/fused_step.py).
# Attention alone, per layer (one thread, 9 heads of 64): 6 queries over 128 keys 280 vs 439
# us, over 512 keys 857 vs 1008; 33 over 128 1268 vs 1009, 12 over 512 1557 vs 1316. End to
# end the one-call step outweighs that: suffix decoding's 33-token rows over ~300 keys ran
# the agent loop of tools/bench_spec_decode.py at 1.73x no speculation with a 4096-pair
# bound and 1.93x-2.00x with 16384 or none. Past 16384 pairs the attention's extra cost
# grows with the context while the call's saving does not.
SHORT_ROW_MAX_QUERIES = 33
SHORT_ROW_MAX_PAIRS = 16384


@dataclass(slots=True)
class DecodeGroup:
    """Consecutive single-query rows attended together, padded to the group's longest context."""

    start: int  # first row (= token) of the group in the step
    end: int
    block_ids: torch.Tensor  # [rows * max_blocks] long: the rows' block tables, flattened
    bias: torch.Tensor  # [rows, 1, 1, max_blocks * block_size]: 0, or -inf past a row's end
    bias_rows: torch.Tensor  # the same as [rows, max_blocks * block_size] (kernels_cpu's)


@dataclass(slots=True)
class PrefillRow:
    """One multi-token row: where its queries sit in the step and what they attend to."""

    query_start: int
    query_len: int
    num_computed: int  # tokens before this chunk, read from the cache
    block_ids: torch.Tensor  # [ceil(context_len / block_size)] long
    mask: torch.Tensor | None  # [query_len, context_len] bool; None: plain causal, no prefix


@dataclass(slots=True)
class AttentionMetadata:
    """One step's attention inputs, built once per step and shared by every layer."""

    positions: torch.Tensor  # [T] long: each new token's position in its sequence
    slot_mapping: torch.Tensor  # [T] long: where each new token's K/V goes
    num_decode_tokens: int  # the first D tokens are single-query rows
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillRow]

    @classmethod
    def build(
        cls,
        query_lens: np.ndarray,
        num_computed: np.ndarray,
        block_tables: np.ndarray,
        block_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        positions: np.ndarray | None = None,
        decode_group_size: int | None = None,
    ) -> AttentionMetadata:
        """From per-row query lengths, computed-token counts and block tables [rows, >= blocks].

        Single-query rows must come first; grouping works best when they are sorted by
        context length.
        """
        layout = step_layout(query_lens, num_computed, block_tables, block_size, positions)
        return cls.from_layout(layout, device, dtype, decode_group_size)

    @classmethod
    def from_layout(
        cls,
        layout: StepLayout,
        device: torch.device | str,
        dtype: torch.dtype,
        decode_group_size: int | None = None,
    ) -> AttentionMetadata:
        group = decode_group_size or DECODE_GROUP_SIZE
        num_decode, num_blocks, tables = layout.num_decode, layout.num_blocks, layout.block_tables
        groups = [
            _decode_group(
                start,
                min(start + group, num_decode),
                layout.context_lens,
                num_blocks,
                tables,
                layout.block_size,
                device,
                dtype,
            )
            for start in range(0, num_decode, group)
        ]
        starts = np.cumsum(layout.query_lens) - layout.query_lens
        prefills = []
        for i in range(num_decode, len(layout.query_lens)):
            start, query_len = int(starts[i]), int(layout.query_lens[i])
            computed, table = int(layout.num_computed[i]), tables[i, : num_blocks[i]]
            short = query_len <= SHORT_ROW_MAX_QUERIES
            if computed and short and query_len * (computed + query_len) <= SHORT_ROW_MAX_PAIRS:
                groups.append(
                    _short_row_group(
                        start, query_len, computed, table, layout.block_size, device, dtype
                    )
                )
            else:
                prefills.append(_prefill_row(start, query_len, computed, table, device))
        return cls(
            positions=torch.from_numpy(layout.positions).to(device),
            slot_mapping=torch.from_numpy(layout.slot_mapping).to(device),
            num_decode_tokens=num_decode,
            decode_groups=groups,
            prefills=prefills,
        )


class NativeBackend(AttentionBackend):
    """Paged attention in torch; its metadata is built on the host, then moved per tensor."""

    name = "native"
    ops = NATIVE_OPS

    def __init__(
        self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        self.device, self.dtype = torch.device(device), dtype

    def prepare(
        self, input_ids: np.ndarray, layout: StepLayout, logits_indices: np.ndarray
    ) -> StepInputs:
        return StepInputs(
            input_ids=torch.from_numpy(input_ids).to(self.device),
            logits_indices=torch.from_numpy(logits_indices).to(self.device),
            meta=AttentionMetadata.from_layout(layout, self.device, self.dtype),
        )

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        write_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return attend(q, k, v, kv_cache[0], kv_cache[1], meta)


def _decode_group(
    start: int,
    end: int,
    context_lens: np.ndarray,
    num_blocks: np.ndarray,
    block_tables: np.ndarray,
    block_size: int,
    device,
    dtype: torch.dtype,
) -> DecodeGroup:
    width = int(num_blocks[start:end].max())
    ids = np.ascontiguousarray(block_tables[start:end, :width], dtype=np.int64).reshape(-1)
    return _group(start, ids, context_lens[start:end], width, block_size, device, dtype)


def _short_row_group(
    start: int,
    query_len: int,
    num_computed: int,
    block_ids: np.ndarray,
    block_size: int,
    device,
    dtype: torch.dtype,
) -> DecodeGroup:
    """A short row's queries as single-query rows sharing its block table (see above)."""
    ids = np.tile(block_ids.astype(np.int64), query_len)
    ends = num_computed + 1 + np.arange(query_len)
    return _group(start, ids, ends, len(block_ids), block_size, device, dtype)


def _group(
    start: int,
    ids: np.ndarray,
    ends: np.ndarray,
    width: int,
    block_size: int,
    device,
    dtype: torch.dtype,
) -> DecodeGroup:
    """Rows [start, start + len(ends)): flattened block tables `ids` of `width` blocks each,
    row r attending to its first ends[r] keys."""
    pad = np.arange(width * block_size)[None, :] >= ends[:, None]
    bias = torch.from_numpy(np.where(pad, -np.inf, 0.0)[:, None, None, :]).to(device, dtype)
    rows = len(ends)
    return DecodeGroup(
        start, start + rows, torch.from_numpy(ids).to(device), bias, bias.view(rows, -1)
    )


def _prefill_row(
    start: int, query_len: int, num_computed: int, block_ids: np.ndarray, device
) -> PrefillRow:
    mask = None
    if num_computed:
        # Query i sits at position num_computed + i and sees keys up to it.
        keys = torch.arange(num_computed + query_len, device=device)
        mask = keys[None, :] <= (torch.arange(query_len, device=device) + num_computed)[:, None]
    ids = torch.from_numpy(block_ids.astype(np.int64)).to(device)
    return PrefillRow(start, query_len, num_computed, ids, mask)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Store new K/V [T, kv_heads, head_dim] into the pools at their slots."""
    kv_heads, head_dim = k_cache.shape[2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Write k, v [T, kv_heads, head_dim] to the cache, then attend q [T, heads, head_dim]."""
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    return attend(q, k, v, k_cache, v_cache, meta)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Attention of q [T, heads, head_dim] over each row's context in the cache (the step's
    own k, v [T, kv_heads, head_dim] already written to it).

    Returns [T, heads * head_dim] in q's dtype; scale is 1/sqrt(head_dim).
    """
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    for group in meta.decode_groups:
        rows = slice(group.start, group.end)
        _decode_attention(q[rows], k_cache, v_cache, group, out[rows])
    for row in meta.prefills:
        rows = slice(row.query_start, row.query_start + row.query_len)
        _prefill_attention(q[rows], k[rows], v[rows], k_cache, v_cache, row, out[rows])
    return out.view(num_tokens, num_heads * head_dim)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[len(block_ids) * block_size, kv_heads, head_dim]: a row's keys or values in order."""
    return cache.index_select(0, block_ids).flatten(0, 1).to(dtype)


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group: DecodeGroup,
    out: torch.Tensor,
) -> None:
    """The group's attention, written into out [rows, heads, head_dim] (contiguous)."""
    rows, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if q.device.type == "cpu" and q.dtype == torch.float32 and _kernel_reads(k_cache, q.shape):
        # kernels_cpu reads the blocks in place: no gathered copy of the group's K/V.
        cpu_ops.paged_decode_attention(
            q.contiguous(),
            k_cache,
            v_cache,
            group.block_ids,
            group.bias_rows,
            head_dim**-0.5,
            out=out,
        )
        return
    k = _gather(k_cache, group.block_ids, q.dtype).view(rows, -1, kv_heads, head_dim)
    v = _gather(v_cache, group.block_ids, q.dtype).view(rows, -1, kv_heads, head_dim)
    # Each KV head's query heads act as that head's query rows: K/V are read once per KV
    # head (enable_gqa, reading them once per query head, is slower here).
    o = F.scaled_dot_product_attention(
        q.view(rows, kv_heads, num_heads // kv_heads, head_dim),
        k.transpose(1, 2),  # [rows, kv_heads, context, head_dim]
        v.transpose(1, 2),
        attn_mask=group.bias,
    )
    out.copy_(o.reshape(rows, num_heads, head_dim))


def _kernel_reads(k_cache: torch.Tensor, q_shape: torch.Size) -> bool:
    """Whether kernels_cpu's decode attention reads this (CPU) cache: fp32, or bf16 where
    its vector path takes the shape (a bf16 KV cache beside bf16 matmuls, models/loader.py)."""
    if k_cache.dtype == torch.float32:
        return cpu_ops.available()
    return k_cache.dtype == torch.bfloat16 and cpu_ops.bf16_attention_supported(
        q_shape[1], k_cache.shape[2], q_shape[2]
    )


def _prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row: PrefillRow,
    out: torch.Tensor,
) -> None:
    """One prefill row's attention, into out [query_len, heads, head_dim] (contiguous)."""
    num_heads, kv_heads = q.shape[1], k.shape[1]
    if (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and k_cache.dtype in (torch.float32, torch.bfloat16)
        and cpu_ops.prefill_attention_supported(num_heads, kv_heads, q.shape[2])
    ):
        # kernels_cpu's flash attention reads the row's keys in the cache, cached prefix and
        # all, where SDPA needs them gathered (kernels_cpu/prefill_attention.cpp); q where
        # the QKV projection left it, the result straight into out.
        cpu_ops.paged_prefill_attention(
            q, k_cache, v_cache, row.block_ids, row.num_computed, q.shape[2] ** -0.5, out
        )
        return
    if row.num_computed == 0:
        # Nothing cached before this chunk: its own K/V, as the cache now holds them (a bf16
        # cache beside fp32 activations: rounded the same way, so later chunks and decode
        # steps, which read the cache, see the same keys).
        keys, values, causal = k, v, True
        if k_cache.dtype != q.dtype:
            keys, values = k.to(k_cache.dtype).to(q.dtype), v.to(v_cache.dtype).to(q.dtype)
    else:
        context = row.num_computed + row.query_len
        keys = _gather(k_cache, row.block_ids, q.dtype)[:context]
        values = _gather(v_cache, row.block_ids, q.dtype)[:context]
        causal = row.mask is None
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # [1, heads, query_len, head_dim]
        keys.transpose(0, 1).unsqueeze(0),
        values.transpose(0, 1).unsqueeze(0),
        attn_mask=row.mask,
        is_causal=causal,
        enable_gqa=kv_heads != num_heads,
    )
    out.copy_(o.squeeze(0).transpose(0, 1))
