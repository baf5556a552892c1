"""Paged-KV-cache attention: the torch reference that runs on CPU and checks CUDA kernels.

Each layer has one K and one V pool of shape [num_blocks, block_size, num_kv_heads, head_dim].
Token t of a request lives in slot `block_table[t // block_size] * block_size + t % block_size`.

A step mixes two kinds of rows, single-query rows first:
  - decode rows (1 query token: a sampled token, or a 1-token prefill chunk), batched in
    groups of DECODE_GROUP_SIZE: K/V gathered through the group's block tables padded to its
    longest row, then one masked softmax attention (SDPA) for the group;
  - prefill rows, one at a time: causal attention over [0, num_computed + query_len), where
    the first num_computed tokens (a cached prefix or earlier chunks) are read from the cache.
Every layer first writes the step's new K/V into the pools for ALL rows, then attends: a row
may read blocks that another row of the same step is filling (a shared prefix).

Math runs in the query's dtype; on a CPU that is fp32 (see model_loader), and so is the CPU
cache: measured on the 2-core AVX2 EPYC for 32 decode rows of 272 tokens (one SmolLM2 layer),
gathering an fp32 cache took 0.7 ms and its SDPA 1.5 ms; a bf16 cache converted back to fp32
cost 0.4-0.9 ms more per layer, and torch's bf16 SDPA is several times slower than fp32.
Gathers use index_select: advanced indexing (`cache[block_tables]`) measured 4-20x slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kernels_cpu import ops as cpu_ops

# Decode rows attended together. Rows come sorted by length, so small groups pad little,
# and a group's gathered K/V (8 rows x 272 tokens: 3.3 MB) stays in cache: for 32 rows of
# 32-640 tokens, groups of 8 took 4.7 ms a layer, one group of 32 took 14-26 ms.
DECODE_GROUP_SIZE = 8


@dataclass(slots=True)
class DecodeGroup:
    """Consecutive single-query rows attended together, padded to the group's longest context."""

    start: int  # first row (= token) of the group in the step
    end: int
    block_ids: torch.Tensor  # [rows * max_blocks] long: the rows' block tables, flattened
    bias: torch.Tensor  # [rows, 1, 1, max_blocks * block_size]: 0, or -inf past a row's end


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
        context length. `positions` is token_positions(query_lens, num_computed) if known.
        """
        query_lens = np.asarray(query_lens, dtype=np.int64)
        num_computed = np.asarray(num_computed, dtype=np.int64)
        if len(query_lens) != len(num_computed) or len(query_lens) > len(block_tables):
            raise ValueError("query_lens, num_computed and block_tables need one entry per row.")
        if (query_lens < 1).any():
            raise ValueError(
                f"every row needs at least one query token, got {query_lens.tolist()}."
            )
        multi = query_lens > 1
        num_decode = int(np.argmax(multi)) if multi.any() else len(query_lens)
        if not multi[num_decode:].all():
            raise ValueError("single-query rows must come before multi-token rows.")
        context_lens = num_computed + query_lens
        num_blocks = -(-context_lens // block_size)
        if (num_blocks > block_tables.shape[1]).any():
            raise ValueError("a row's context needs more blocks than its block table holds.")
        if positions is None:
            positions = token_positions(query_lens, num_computed)
        group = decode_group_size or DECODE_GROUP_SIZE
        row_of_token = np.repeat(np.arange(len(query_lens)), query_lens)
        slots = block_tables[row_of_token, positions // block_size].astype(np.int64) * block_size
        slots += positions % block_size
        groups = [
            _decode_group(
                start,
                min(start + group, num_decode),
                context_lens,
                num_blocks,
                block_tables,
                block_size,
                device,
                dtype,
            )
            for start in range(0, num_decode, group)
        ]
        starts = np.cumsum(query_lens) - query_lens
        prefills = [
            _prefill_row(
                int(starts[i]),
                int(query_lens[i]),
                int(num_computed[i]),
                block_tables[i, : num_blocks[i]],
                device,
            )
            for i in range(num_decode, len(query_lens))
        ]
        return cls(
            positions=torch.from_numpy(positions).to(device),
            slot_mapping=torch.from_numpy(slots).to(device),
            num_decode_tokens=num_decode,
            decode_groups=groups,
            prefills=prefills,
        )


def token_positions(query_lens: np.ndarray, num_computed: np.ndarray) -> np.ndarray:
    """Position of every token of a flattened step: row i covers [num_computed, +query_len)."""
    starts = np.cumsum(query_lens) - query_lens
    offsets = np.arange(int(query_lens.sum())) - np.repeat(starts, query_lens)
    return offsets + np.repeat(num_computed, query_lens)


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
    pad = np.arange(width * block_size)[None, :] >= context_lens[start:end, None]
    bias = torch.from_numpy(np.where(pad, -np.inf, 0.0)[:, None, None, :])
    return DecodeGroup(start, end, torch.from_numpy(ids).to(device), bias.to(device, dtype))


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
    """Write k, v [T, kv_heads, head_dim] to the cache, then attend q [T, heads, head_dim].

    Returns [T, heads * head_dim] in q's dtype; scale is 1/sqrt(head_dim).
    """
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    for group in meta.decode_groups:
        rows = slice(group.start, group.end)
        out[rows] = _decode_attention(q[rows], k_cache, v_cache, group)
    for row in meta.prefills:
        rows = slice(row.query_start, row.query_start + row.query_len)
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], k_cache, v_cache, row)
    return out.view(num_tokens, num_heads * head_dim)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[len(block_ids) * block_size, kv_heads, head_dim]: a row's keys or values in order."""
    return cache.index_select(0, block_ids).flatten(0, 1).to(dtype)


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup
) -> torch.Tensor:
    rows, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if q.device.type == "cpu" and q.dtype == k_cache.dtype == torch.float32 and cpu_ops.available():
        # kernels_cpu reads the blocks in place: no gathered copy of the group's K/V.
        bias = group.bias.reshape(rows, -1)
        return cpu_ops.paged_decode_attention(
            q.contiguous(), k_cache, v_cache, group.block_ids, bias, head_dim**-0.5
        )
    k = _gather(k_cache, group.block_ids, q.dtype).view(rows, -1, kv_heads, head_dim)
    v = _gather(v_cache, group.block_ids, q.dtype).view(rows, -1, kv_heads, head_dim)
    # Each KV head's query heads act as that head's query rows: K/V are read once per KV
    # head (enable_gqa measured 1.7x slower here, reading them once per query head).
    o = F.scaled_dot_product_attention(
        q.view(rows, kv_heads, num_heads // kv_heads, head_dim),
        k.transpose(1, 2),  # [rows, kv_heads, context, head_dim]
        v.transpose(1, 2),
        attn_mask=group.bias,
    )
    return o.reshape(rows, num_heads, head_dim)


def _prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row: PrefillRow,
) -> torch.Tensor:
    num_heads, kv_heads = q.shape[1], k.shape[1]
    if row.num_computed == 0 and k_cache.dtype == q.dtype:
        # Nothing cached before this chunk: its own K/V are exactly what the cache now holds.
        keys, values, causal = k, v, True
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
    return o.squeeze(0).transpose(0, 1)
