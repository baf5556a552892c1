"""Kernel-vs-reference checks shared by the GPU tests and the CPU-emulated ones.

Each check builds fresh random inputs on `device`, fills the output with NaN so that any
element the kernel leaves unwritten shows, runs the public op from kernels_cuda.ops and
compares with kernels_cuda.reference run on CPU copies.
"""

from __future__ import annotations

import math

import torch
from paged_inputs import cu_seqlens, make_paged_kv, rel_err

from kernels_cuda import ops, reference

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 5e-3}


def _randn(*shape, dtype, device, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def check_decode(
    device,
    dtype,
    lens,
    num_q_heads,
    num_kv_heads,
    head_dim,
    block_size,
    max_context_len=None,
    seed=0,
) -> float:
    kv = make_paged_kv(lens, num_kv_heads, head_dim, block_size, dtype, device, seed)
    query = _randn(len(lens), num_q_heads, head_dim, dtype=dtype, device=device, seed=seed + 1)
    out = torch.full_like(query, float("nan"))
    scale = 1 / math.sqrt(head_dim)
    ops.paged_attention_decode(
        out, query, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale, max_context_len
    )
    expected = reference.paged_attention_decode(
        torch.empty_like(query, device="cpu"),
        query.cpu(),
        kv.k_cache.cpu(),
        kv.v_cache.cpu(),
        kv.block_tables.cpu(),
        kv.context_lens.cpu(),
        scale,
    )
    err = rel_err(out, expected)
    assert err < TOLERANCE[dtype], f"decode relative error {err}"
    return err


def check_prefill(
    device, dtype, q_lens, ctx_lens, num_q_heads, num_kv_heads, head_dim, block_size, seed=0
) -> float:
    kv = make_paged_kv(ctx_lens, num_kv_heads, head_dim, block_size, dtype, device, seed)
    query = _randn(sum(q_lens), num_q_heads, head_dim, dtype=dtype, device=device, seed=seed + 1)
    out = torch.full_like(query, float("nan"))
    cu = cu_seqlens(q_lens, device)
    scale = 1 / math.sqrt(head_dim)
    ops.paged_attention_prefill(
        out, query, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.context_lens, scale, max(q_lens)
    )
    expected = reference.paged_attention_prefill(
        torch.empty_like(query, device="cpu"),
        query.cpu(),
        kv.k_cache.cpu(),
        kv.v_cache.cpu(),
        kv.block_tables.cpu(),
        cu.cpu(),
        kv.context_lens.cpu(),
        scale,
        max(q_lens),
    )
    err = rel_err(out, expected)
    assert err < TOLERANCE[dtype], f"prefill relative error {err}"
    return err


def check_reshape_and_cache(
    device, dtype, num_tokens, num_q_heads, num_kv_heads, head_dim, block_size, seed=0
) -> None:
    """Key and value are column slices of one qkv projection, as the model produces them."""
    num_blocks = -(-num_tokens // block_size) + 2
    qkv = _randn(
        num_tokens,
        (num_q_heads + 2 * num_kv_heads) * head_dim,
        dtype=dtype,
        device=device,
        seed=seed,
    )
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    key = qkv[:, q_size : q_size + kv_size]
    value = qkv[:, q_size + kv_size :]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = _randn(*shape, dtype=dtype, device=device, seed=seed + 1)
    v_cache = _randn(*shape, dtype=dtype, device=device, seed=seed + 2)
    gen = torch.Generator().manual_seed(seed + 3)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.rand(num_tokens, generator=gen) < 0.2] = -1  # padding tokens
    k_expected, v_expected = k_cache.cpu().clone(), v_cache.cpu().clone()
    reference.reshape_and_cache(key.cpu(), value.cpu(), k_expected, v_expected, slots)
    ops.reshape_and_cache(key, value, k_cache, v_cache, slots.to(device))
    assert torch.equal(k_cache.cpu(), k_expected)
    assert torch.equal(v_cache.cpu(), v_expected)


def check_fused_add_rms_norm(device, dtype, num_tokens, hidden, seed=0) -> None:
    x = _randn(num_tokens, hidden, dtype=dtype, device=device, seed=seed)
    residual = _randn(num_tokens, hidden, dtype=dtype, device=device, seed=seed + 1)
    weight = _randn(hidden, dtype=dtype, device=device, seed=seed + 2)
    x_ref, res_ref = x.cpu().clone(), residual.cpu().clone()
    reference.fused_add_rms_norm(x_ref, res_ref, weight.cpu(), 1e-5)
    ops.fused_add_rms_norm(x, residual, weight, 1e-5)
    assert rel_err(residual, res_ref) == 0.0  # one rounding of the same fp32 sum
    err = rel_err(x, x_ref)
    assert err < TOLERANCE[dtype], f"fused_add_rms_norm relative error {err}"
    out = torch.full_like(x, float("nan"))
    ops.rms_norm(out, residual, weight, 1e-5)
    expected = reference.rms_norm(torch.empty_like(x, device="cpu"), res_ref, weight.cpu(), 1e-5)
    assert rel_err(out, expected) < TOLERANCE[dtype]


def check_rotary(
    device,
    dtype,
    num_tokens,
    num_q_heads,
    num_kv_heads,
    head_dim,
    rot_dim,
    concatenated_cache=False,
    seed=0,
) -> None:
    max_pos = 4096
    cos, sin = reference.cos_sin_cache(rot_dim, max_pos)
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(max_pos, (num_tokens,), generator=gen)
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = _randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, device=device, seed=seed + 1)
    query, key = qkv[:, :q_size], qkv[:, q_size : q_size + kv_size]
    q_ref, k_ref = query.cpu().clone(), key.cpu().clone()
    reference.rotary_embedding(positions, q_ref, k_ref, cos, sin, head_dim)
    if concatenated_cache:
        caches = (torch.cat([cos, sin], dim=1).to(device), None)
    else:
        caches = (cos.to(device), sin.to(device))
    ops.rotary_embedding(positions.to(device), query, key, *caches, head_dim)
    for got, expected in ((query, q_ref), (key, k_ref)):
        err = rel_err(got, expected)
        assert err < TOLERANCE[dtype], f"rotary relative error {err}"


def check_silu_and_mul(device, dtype, num_tokens, inter, seed=0) -> None:
    x = _randn(num_tokens, 2 * inter, dtype=dtype, device=device, seed=seed)
    out = torch.full((num_tokens, inter), float("nan"), dtype=dtype, device=device)
    ops.silu_and_mul(out, x)
    expected = reference.silu_and_mul(torch.empty(num_tokens, inter, dtype=dtype), x.cpu())
    err = rel_err(out, expected)
    assert err < TOLERANCE[dtype], f"silu_and_mul relative error {err}"


def check_decode_needles(
    device, dtype, context_len, needles, num_q_heads, num_kv_heads, head_dim, block_size, seed=0
) -> None:
    """One sequence per needle; V is zero except 1.0 at the needle's token, so every output
    element is that token's softmax weight and losing or misplacing it (a partition or block
    boundary off by one) gives a relative error of about 1, far beyond rounding."""
    lens = [context_len] * len(needles)
    kv = make_paged_kv(lens, num_kv_heads, head_dim, block_size, dtype, "cpu", seed)
    kv.v_cache.zero_()
    for s, pos in enumerate(needles):
        kv.v_cache[kv.block_tables[s, pos // block_size], pos % block_size] = 1.0
    query = _randn(len(lens), num_q_heads, head_dim, dtype=dtype, device="cpu", seed=seed + 1)
    out = torch.full_like(query, float("nan"), device=device)
    scale = 1 / math.sqrt(head_dim)
    ops.paged_attention_decode(
        out,
        query.to(device),
        kv.k_cache.to(device),
        kv.v_cache.to(device),
        kv.block_tables.to(device),
        kv.context_lens.to(device),
        scale,
    )
    expected = reference.paged_attention_decode(
        torch.empty_like(query),
        query,
        kv.k_cache,
        kv.v_cache,
        kv.block_tables,
        kv.context_lens,
        scale,
    )
    for s, pos in enumerate(needles):
        err = rel_err(out[s], expected[s])
        assert err < TOLERANCE[dtype], f"needle at token {pos} of {context_len}: error {err}"
