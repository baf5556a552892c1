"""Plain-torch references of the CUDA kernels: the CPU implementation and the test oracle.

Each function has the same signature and in-place semantics as its namesake in ops.py. They
compute in fp32 and round to the storage dtype only when storing, as the kernels do. They
favour obvious code over speed, but are vectorized over tokens where that costs no clarity
so that the CPU engine stays usable.
"""

from __future__ import annotations

import torch


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes key/value [T, Hkv, D] (or [T, Hkv*D]) into caches [num_blocks, block_size, Hkv,
    D] at slots.

    A slot is block_id * block_size + offset; slot -1 marks a padding token (skipped).
    """
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    slots = slot_mapping.long()
    bad = (slots < -1) | (slots >= num_slots)
    if bool(bad.any()):
        raise ValueError(
            f"slot_mapping has slots outside [-1, {num_slots}): {slots[bad][:8].tolist()}"
        )
    keep = slots >= 0
    flat_k = k_cache.view(num_slots, *k_cache.shape[2:])
    flat_v = v_cache.view(num_slots, *v_cache.shape[2:])
    rows = (key.shape[0], *k_cache.shape[2:])  # key may come as [T, Hkv * D]
    flat_k[slots[keep]] = key.reshape(rows)[keep].to(k_cache.dtype)
    flat_v[slots[keep]] = value.reshape(rows)[keep].to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence's paged K or V, as [length, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    if num_blocks > block_table.shape[0]:
        raise ValueError(
            f"context length {length} needs {num_blocks} blocks; the block table has "
            f"{block_table.shape[0]}"
        )
    blocks = block_table[:num_blocks].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, offset: int):
    """Causal attention of q [Lq, Hq, D] over k, v [Lk, Hkv, D] in fp32; query i sees keys
    0..offset + i. Returns [Lq, Hq, D] fp32."""
    group = q.shape[1] // k.shape[1]
    qf = q.float().transpose(0, 1)  # [Hq, Lq, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Lk, D]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [Hq, Lq, Lk]
    key_pos = torch.arange(k.shape[0], device=q.device)
    query_pos = torch.arange(q.shape[0], device=q.device) + offset
    scores = scores.masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vf).transpose(0, 1)


def paged_attention_decode(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence, query [S, Hq, D], over its paged context.

    block_tables [S, max_blocks] and context_lens [S] are int32; a sequence with an empty
    context gets zeros. Writes and returns out [S, Hq, D].
    """
    lens = context_lens.tolist()
    for s, length in enumerate(lens):
        if length == 0:
            out[s] = 0
            continue
        k = gather_kv(k_cache, block_tables[s], length)
        v = gather_kv(v_cache, block_tables[s], length)
        out[s] = _attend(query[s : s + 1], k, v, scale, length - 1)[0].to(out.dtype)
    return out


def paged_attention_prefill(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_q_len: int,
) -> torch.Tensor:
    """Causal attention of packed new tokens query [T, Hq, D] over each sequence's cache.

    Sequence s owns query rows cu_seqlens_q[s]:cu_seqlens_q[s+1]; context_lens[s] counts
    its cached prefix plus its new tokens (already in the cache), so new token i sits at
    position context_len - q_len + i. Writes and returns out [T, Hq, D].
    """
    starts = cu_seqlens_q.tolist()
    for s, length in enumerate(context_lens.tolist()):
        q0, q1 = starts[s], starts[s + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        if q_len > length or q_len > max_q_len:
            raise ValueError(
                f"sequence {s}: {q_len} new tokens but context length {length} and "
                f"max_q_len {max_q_len}"
            )
        k = gather_kv(k_cache, block_tables[s], length)
        v = gather_kv(v_cache, block_tables[s], length)
        out[q0:q1] = _attend(query[q0:q1], k, v, scale, length - q_len).to(out.dtype)
    return out


def rms_norm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """out = x / sqrt(mean(x^2) + eps) * weight over the last dim, in fp32."""
    xf = x.float()
    inv_rms = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    out.copy_((xf * inv_rms * weight.float()).to(out.dtype))
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: residual += x; x = rmsnorm(residual) * weight (norm of the fp32 sum)."""
    total = x.float() + residual.float()
    residual.copy_(total.to(residual.dtype))
    inv_rms = torch.rsqrt(total.pow(2).mean(dim=-1, keepdim=True) + eps)
    x.copy_((total * inv_rms * weight.float()).to(x.dtype))


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor | None,
    head_dim: int,
) -> None:
    """Neox-style (rotate_half) rotary embedding of query/key [T, H, head_dim] in place.

    cos_cache and sin_cache are [max_position, rot_dim / 2] fp32; or, with sin_cache None,
    cos_cache is [max_position, rot_dim] holding cos then sin. Only the first rot_dim dims
    of each head rotate.
    """
    cos, sin = split_cos_sin(cos_cache, sin_cache)
    pos = positions.long()
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= cos.shape[0]):
        raise ValueError(
            f"positions must lie in [0, {cos.shape[0]}); got min {int(pos.min())}, "
            f"max {int(pos.max())}"
        )
    half = cos.shape[1]
    c = cos[pos].unsqueeze(1)  # [T, 1, half]
    s = sin[pos].unsqueeze(1)
    for x in (query, key):
        if x is None:
            continue
        heads = x.view(x.shape[0], -1, head_dim)
        x1 = heads[..., :half].float()
        x2 = heads[..., half : 2 * half].float()
        rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        heads[..., : 2 * half] = rotated.to(x.dtype)


def split_cos_sin(
    cos_cache: torch.Tensor, sin_cache: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [max_position, rot_dim / 2], from either cache layout."""
    if sin_cache is not None:
        return cos_cache, sin_cache
    half = cos_cache.shape[-1] // 2
    return cos_cache[:, :half], cos_cache[:, half:]


def cos_sin_cache(
    rot_dim: int, max_position: int, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard rotary tables: (cos, sin), each [max_position, rot_dim / 2] fp32."""
    if rot_dim % 2:
        raise ValueError(f"rot_dim must be even, got {rot_dim}")
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def silu_and_mul(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out [T, I] = silu(x[:, :I]) * x[:, I:] for x [T, 2I], in fp32."""
    inter = x.shape[-1] // 2
    xf = x.float()
    out.copy_((torch.nn.functional.silu(xf[..., :inter]) * xf[..., inter:]).to(out.dtype))
    return out
