"""Random paged-attention inputs for the kernel tests, built from dense per-sequence K/V."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedKV:
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor  # [num_seqs] int32
    dense_k: list[torch.Tensor]  # per sequence [context_len, num_kv_heads, head_dim]
    dense_v: list[torch.Tensor]


def make_paged_kv(
    lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> PagedKV:
    """Scatters random dense K/V into shuffled cache blocks.

    Blocks no sequence owns hold random values too, and unused block-table entries point at
    such blocks, so reading past a context or through a wrong entry changes the result.
    """
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in lens]
    spare = 3
    num_blocks = sum(needed) + spare
    max_blocks = max(needed + [1]) + 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen)
    owned, junk = order[: sum(needed)], order[sum(needed) :]
    tables = junk[torch.randint(len(junk), (len(lens), max_blocks), generator=gen)].int()
    dense_k, dense_v, at = [], [], 0
    for s, n in enumerate(lens):
        blocks = owned[at : at + needed[s]]
        at += needed[s]
        tables[s, : needed[s]] = blocks.int()
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        for t in range(n):
            k_cache[blocks[t // block_size], t % block_size] = k[t]
            v_cache[blocks[t // block_size], t % block_size] = v[t]
        dense_k.append(k)
        dense_v.append(v)
    return PagedKV(
        k_cache.to(device),
        v_cache.to(device),
        tables.to(device),
        torch.tensor(lens, dtype=torch.int32, device=device),
        dense_k,
        dense_v,
    )


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|; inf where actual has NaN/inf."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.abs().max().clamp_min(1e-6)
    return float((actual - expected).abs().max() / scale)


def cu_seqlens(q_lens: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """[0, q0, q0+q1, ...] as int32."""
    out = [0]
    for n in q_lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)
