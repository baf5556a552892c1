"""The kernels the model calls: CUDA kernels for CUDA tensors, torch references otherwise.

Every function validates its inputs on both paths, then runs the NVRTC-compiled kernel when
the tensors are on a CUDA device and kernels_cuda.reference otherwise. Kernels are compiled
per (storage dtype, head_dim) at first use; see compiler.py.

Not here because torch is already as fast: the linear layers (cuBLAS GEMMs through
torch.nn.functional.linear), the embedding lookup, the LM head and the sampler's softmax /
top-k, which are single large library calls with nothing to fuse at this size.
"""

from __future__ import annotations

import torch

from kernels_cuda import launch, reference

# --------------------------------------------------------------------------- public API


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes key/value [T, Hkv, D] (or [T, Hkv*D]) into the paged caches at slot_mapping.

    Caches are [num_blocks, block_size, Hkv, D]; slot_mapping [T] int64 holds
    block_id * block_size + offset per token, or -1 to skip a padding token. On CUDA an
    out-of-range slot is skipped (checking would need a device sync); the reference raises.
    """
    _check_cache_pair(k_cache, v_cache)
    _, _, num_kv_heads, head_dim = k_cache.shape
    num_tokens = slot_mapping.shape[0] if slot_mapping.dim() == 1 else -1
    if slot_mapping.dim() != 1 or slot_mapping.dtype != torch.int64:
        raise ValueError(
            f"slot_mapping must be 1-D int64, got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )
    key = _as_heads("key", key, num_tokens, num_kv_heads, head_dim)
    value = _as_heads("value", value, num_tokens, num_kv_heads, head_dim)
    for name, t in (("key", key), ("value", value)):
        if t.dtype != k_cache.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from the cache's {k_cache.dtype}")
    _same_device(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    if not _use_cuda(k_cache):
        reference.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)
        return
    launch.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


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
    """Decode attention: one query token per sequence over its paged K/V; returns out.

    query/out [S, Hq, D]; caches [num_blocks, block_size, Hkv, D] with Hq % Hkv == 0;
    block_tables [S, max_blocks] int32; context_lens [S] int32 (tokens in the cache, this
    step's token included). max_context_len, an upper bound on context_lens known on the
    host, sizes the split along the sequence; without it max_blocks * block_size is used.
    """
    num_seqs, num_q_heads, head_dim = _check_attention_args(
        out, query, k_cache, v_cache, block_tables, context_lens, num_seqs=query.shape[0]
    )
    if max_context_len is not None and max_context_len < 0:
        raise ValueError(f"max_context_len must be >= 0, got {max_context_len}")
    if not _use_cuda(query):
        return reference.paged_attention_decode(
            out, query, k_cache, v_cache, block_tables, context_lens, scale
        )
    launch.paged_attention_decode(
        out, query, k_cache, v_cache, block_tables, context_lens, scale, max_context_len
    )
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
    """Causal attention of packed new tokens over cached prefixes (chunked prefill).

    query/out [T, Hq, D]; cu_seqlens_q [S+1] int32 (sequence s owns rows cu[s]:cu[s+1]);
    context_lens [S] int32 counts cached plus new tokens, the new ones already written to
    the cache, so it must be >= the sequence's new-token count (checked by the reference
    only: on CUDA that would need a device sync); max_q_len >= every sequence's new-token
    count, and sizes the grid. Returns out.
    """
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.dtype != torch.int32:
        raise ValueError(
            f"cu_seqlens_q must be 1-D int32, got {cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}"
        )
    _check_attention_args(
        out, query, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q.shape[0] - 1
    )
    if max_q_len < 0:
        raise ValueError(f"max_q_len must be >= 0, got {max_q_len}")
    _same_device(query=query, cu_seqlens_q=cu_seqlens_q)
    if not _use_cuda(query):
        return reference.paged_attention_prefill(
            out, query, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, max_q_len
        )
    launch.paged_attention_prefill(
        out, query, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, max_q_len
    )
    return out


def rms_norm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """out = rmsnorm(x) * weight over the last dim (fp32 math); out may be x. Returns out."""
    x2, hidden = _rows("x", x, weight)
    out2, _ = _rows("out", out, weight)
    _check_norm_args(x2, out2, weight, eps)
    if not _use_cuda(x):
        reference.rms_norm(out2, x2, weight, eps)
    else:
        launch.rms_norm(out2, x2, None, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: residual += x; x = rmsnorm(residual) * weight, all in fp32."""
    x2, _ = _rows("x", x, weight)
    r2, _ = _rows("residual", residual, weight)
    _check_norm_args(x2, r2, weight, eps)
    if x.data_ptr() == residual.data_ptr():
        raise ValueError("x and residual must not share memory")
    if not _use_cuda(x):
        reference.fused_add_rms_norm(x2, r2, weight, eps)
    else:
        launch.rms_norm(x2, x2, r2, weight, eps)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor | None,
    head_dim: int,
) -> None:
    """Neox-style rotary embedding of query [T, Hq(*)D] and key [T, Hkv(*)D] in place.

    positions [T] int64. cos_cache, sin_cache: [max_position, rot_dim / 2] fp32; or pass
    sin_cache=None and cos_cache [max_position, rot_dim] = cat(cos, sin). The first rot_dim
    (<= head_dim) dims of each head rotate. key may be None.
    """
    cos, sin = reference.split_cos_sin(cos_cache, sin_cache)
    if positions.dim() != 1 or positions.dtype != torch.int64:
        raise ValueError(
            f"positions must be 1-D int64, got {positions.dtype} {tuple(positions.shape)}"
        )
    if cos.dim() != 2 or cos.shape != sin.shape or cos.dtype != torch.float32:
        raise ValueError(
            f"cos/sin caches must be two [max_position, rot_dim/2] float32 tables, got "
            f"{cos.dtype} {tuple(cos.shape)} and {sin.dtype} {tuple(sin.shape)}"
        )
    if head_dim <= 0 or 2 * cos.shape[1] > head_dim:
        raise ValueError(f"rot_dim {2 * cos.shape[1]} must be in (0, head_dim={head_dim}]")
    tensors = {"query": query} if key is None else {"query": query, "key": key}
    for name, t in tensors.items():
        heads_ok = t.shape[-1] % head_dim == 0 if t.dim() == 2 else t.shape[-1] == head_dim
        if t.dim() not in (2, 3) or t.shape[0] != positions.shape[0] or not heads_ok:
            raise ValueError(
                f"{name} must be [T={positions.shape[0]}, heads * {head_dim}] or "
                f"[T, heads, {head_dim}], got {tuple(t.shape)}"
            )
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} has unsupported dtype {t.dtype}")
    _same_device(positions=positions, cos=cos, sin=sin, **tensors)
    if not _use_cuda(query):
        reference.rotary_embedding(positions, query, key, cos, sin, head_dim)
        return
    launch.rotary_embedding(positions, query, key, cos, sin, head_dim)


def silu_and_mul(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out [T, I] = silu(x[:, :I]) * x[:, I:] for x [T, 2I], fp32 math. Returns out."""
    if x.dim() != 2 or x.shape[1] % 2 or out.shape != (x.shape[0], x.shape[1] // 2):
        raise ValueError(
            f"silu_and_mul needs x [T, 2I] and out [T, I], got {tuple(x.shape)}, {tuple(out.shape)}"
        )
    if out.dtype != x.dtype:
        raise ValueError(f"out dtype {out.dtype} differs from x's {x.dtype}")
    _same_device(out=out, x=x)
    if not _use_cuda(x):
        return reference.silu_and_mul(out, x)
    launch.silu_and_mul(out, x)
    return out


def _use_cuda(t: torch.Tensor) -> bool:
    """Whether to launch the CUDA kernel (tests redirect this to an emulator)."""
    return t.is_cuda


# --------------------------------------------------------------------------- validation


def _same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors are on different devices: {devices}")


def _check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4:
        raise ValueError(
            f"k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"v_cache {v_cache.dtype} {tuple(v_cache.shape)} does not match k_cache "
            f"{k_cache.dtype} {tuple(k_cache.shape)}"
        )


def _as_heads(name: str, t: torch.Tensor, tokens: int, heads: int, head_dim: int) -> torch.Tensor:
    """Views t as [tokens, heads, head_dim], accepting [tokens, heads * head_dim] too."""
    if t.shape[0] != tokens or t[0].numel() != heads * head_dim or t.dim() not in (2, 3):
        raise ValueError(
            f"{name} must be [{tokens}, {heads}, {head_dim}] or [{tokens}, {heads * head_dim}], "
            f"got {tuple(t.shape)}"
        )
    try:
        return t.view(tokens, heads, head_dim)
    except RuntimeError as e:
        raise ValueError(
            f"{name} {tuple(t.shape)} strides {t.stride()} cannot be viewed as heads"
        ) from e


def _check_attention_args(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    num_seqs: int,
) -> tuple[int, int, int]:
    _check_cache_pair(k_cache, v_cache)
    _, _, num_kv_heads, head_dim = k_cache.shape
    if query.dim() != 3 or query.shape[2] != head_dim:
        raise ValueError(
            f"query must be [tokens, num_q_heads, {head_dim}], got {tuple(query.shape)}"
        )
    if query.shape[1] % num_kv_heads:
        raise ValueError(
            f"num_q_heads {query.shape[1]} is not a multiple of num_kv_heads {num_kv_heads}"
        )
    if out.shape != query.shape or out.dtype != query.dtype:
        raise ValueError(
            f"out {out.dtype} {tuple(out.shape)} must match query {query.dtype} {tuple(query.shape)}"
        )
    if query.dtype != k_cache.dtype:
        raise ValueError(f"query dtype {query.dtype} differs from the cache's {k_cache.dtype}")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables must be [{num_seqs}, max_blocks], got {tuple(block_tables.shape)}"
        )
    if context_lens.shape != (num_seqs,):
        raise ValueError(f"context_lens must be [{num_seqs}], got {tuple(context_lens.shape)}")
    _same_device(
        out=out, query=query, k_cache=k_cache, block_tables=block_tables, context_lens=context_lens
    )
    return num_seqs, query.shape[1], head_dim


def _rows(name: str, t: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    hidden = weight.shape[-1]
    if weight.dim() != 1 or t.shape[-1] != hidden:
        raise ValueError(f"{name} {tuple(t.shape)} does not end in weight's size {hidden}")
    try:
        return t.view(-1, hidden), hidden
    except RuntimeError as e:
        raise ValueError(
            f"{name} {tuple(t.shape)} strides {t.stride()} cannot be viewed as rows"
        ) from e


def _check_norm_args(
    x: torch.Tensor, other: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if x.shape != other.shape or x.dtype != other.dtype or weight.dtype != x.dtype:
        raise ValueError(
            f"shapes/dtypes differ: {x.dtype} {tuple(x.shape)}, {other.dtype} "
            f"{tuple(other.shape)}, weight {weight.dtype}"
        )
    _same_device(x=x, other=other, weight=weight)
