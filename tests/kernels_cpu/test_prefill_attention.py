"""kernels_cpu's causal prefill attention over the paged cache against gather + torch SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels_cpu import ops

pytestmark = pytest.mark.skipif(
    not ops.prefill_attention_supported(9, 3, 64), reason="the kernel is AVX-512's"
)


def reference(q, k_cache, v_cache, block_ids, num_computed):
    query_len, heads, hd = q.shape
    kvh = k_cache.shape[2]
    n = num_computed + query_len
    k = k_cache.index_select(0, block_ids).flatten(0, 1)[:n].float()
    v = v_cache.index_select(0, block_ids).flatten(0, 1)[:n].float()
    keys = torch.arange(n)
    mask = keys[None, :] <= (torch.arange(query_len) + num_computed)[:, None]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        enable_gqa=kvh != heads,
    )
    return o.squeeze(0).transpose(0, 1)


def bf16_products(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel multiplies in bf16 here: a bf16 pool and, on a CPU with AMX tiles, a
    head_dim % 32 == 0 up to 128 and at most 4 query heads a KV head, or on an AVX512-BF16 CPU
    without AMX a head_dim of 32, 64, 96 or 128 (otherwise it widens the pool and multiplies
    in fp32)."""
    return dtype == torch.bfloat16 and ops.prefill_attention_bf16_products(
        heads, kv_heads, head_dim
    )


def test_bf16_products_are_taken_where_they_pay():
    with open("/proc/cpuinfo") as f:
        amx = " amx_bf16" in f.read()
    for heads, kv_heads, head_dim in [(9, 3, 64), (8, 2, 128), (8, 1, 64), (6, 3, 48), (4, 4, 96)]:
        if not ops.has_bf16_gemm():
            expected = False
        elif amx:  # a build for AMX has no vdpbf16ps task: tiles (where granted) or fp32
            expected = ops.bf16_amx() and head_dim % 32 == 0 and heads // kv_heads <= 4
        else:
            expected = head_dim in (32, 64, 96, 128)
        assert ops.prefill_attention_bf16_products(heads, kv_heads, head_dim) == expected


# Group sizes 3, 1, 4, 6, 8, 2; head_dims 64, 32, 48, 128 and 96 (value passes of 4, 2, 1,
# 8 and 6 vectors); chunks after a cached prefix and from the start; lengths off the
# 8-query and 32-key tiles.
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim",
    [(9, 3, 64), (4, 4, 32), (8, 2, 48), (12, 2, 64), (8, 1, 64), (4, 2, 128), (6, 3, 96)],
)
@pytest.mark.parametrize("num_computed,query_len", [(0, 1), (0, 7), (0, 100), (45, 33), (5, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles", ["as-built", "amx-off"])
def test_prefill_attention_reads_the_cache_in_place_like_gather_then_sdpa(
    heads, kv_heads, head_dim, num_computed, query_len, dtype, tiles
):
    # amx-off: where AMX tiles take a bf16 pool's products, the path without them (the fp32
    # task over the widened pool) on the same inputs.
    if tiles == "amx-off":
        if dtype != torch.bfloat16 or not ops.bf16_amx():
            pytest.skip("no AMX tiles to switch off for this case")
        ops.bf16_amx(False)
    try:
        check_prefill_attention(heads, kv_heads, head_dim, num_computed, query_len, dtype)
    finally:
        if tiles == "amx-off":
            ops.bf16_amx(True)


def check_prefill_attention(heads, kv_heads, head_dim, num_computed, query_len, dtype):
    g = torch.Generator().manual_seed(heads + head_dim + query_len + num_computed)
    block_size = 16 if query_len != 33 else 4
    num_blocks = 64
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    width = -(-(num_computed + query_len) // block_size)
    block_ids = torch.randperm(num_blocks, generator=g)[:width].contiguous()
    q = torch.randn(query_len, heads, head_dim, generator=g)
    got = ops.paged_prefill_attention(q, k_cache, v_cache, block_ids, num_computed, head_dim**-0.5)
    if not bf16_products(dtype, heads, kv_heads, head_dim):
        want = reference(q, k_cache, v_cache, block_ids, num_computed)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
        return
    # bf16 products: the queries rounded to bf16 (the reference does it too) and the
    # probabilities rounded to bf16 before P @ V (within each 32-key tile's online softmax,
    # which no reference repeats): errors of a few bf16 roundings of values of size ~1, and
    # small on average (a key left out or counted twice among 100 moves the mean by ~1e-2).
    want = reference(q.bfloat16().float(), k_cache, v_cache, block_ids, num_computed)
    err = (got - want).abs()
    assert err.max() < 1e-2 and err.mean() < 1e-3, (err.max(), err.mean())


def test_prefill_attention_refuses_bad_inputs_by_name():
    k = torch.zeros(4, 16, 2, 64)
    ids = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="multiple of 2 KV heads"):
        ops.paged_prefill_attention(torch.zeros(3, 3, 64), k, k, ids, 0, 1.0)
    with pytest.raises(ValueError, match="do not hold 40 tokens"):
        ops.paged_prefill_attention(torch.zeros(8, 4, 64), k, k, ids, 32, 1.0)
    with pytest.raises(ValueError, match="head_dim % 16 == 0"):
        k20 = torch.zeros(4, 16, 2, 20)
        ops.paged_prefill_attention(torch.zeros(3, 4, 20), k20, k20, ids, 0, 1.0)
    with pytest.raises(ValueError, match="both be fp32 or bf16"):
        ops.paged_prefill_attention(torch.zeros(3, 4, 64), k, k.bfloat16(), ids, 0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_reads_q_inside_the_qkv_output_and_writes_into_out(dtype):
    """q as the model has it, a view of the QKV projection's output (tokens 12 heads apart),
    gives what a contiguous copy gives, written into the caller's out."""
    heads, kv_heads, head_dim, query_len = 9, 3, 64, 40
    g = torch.Generator().manual_seed(7)
    k_cache = torch.randn(8, 16, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(8, 16, kv_heads, head_dim, generator=g).to(dtype)
    block_ids = torch.tensor([5, 2, 7], dtype=torch.int64)
    qkv = torch.randn(query_len, heads + 2 * kv_heads, head_dim, generator=g)
    q = qkv[:, :heads]
    assert not q.is_contiguous()
    want = ops.paged_prefill_attention(q.contiguous(), k_cache, v_cache, block_ids, 3, 0.125)
    out = torch.full((query_len, heads, head_dim), float("nan"))
    got = ops.paged_prefill_attention(q, k_cache, v_cache, block_ids, 3, 0.125, out)
    assert got is out
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="each token's heads contiguous"):
        ops.paged_prefill_attention(q.transpose(0, 1), k_cache, v_cache, block_ids, 3, 0.125)
    with pytest.raises(ValueError, match="out must be contiguous float32"):
        ops.paged_prefill_attention(q, k_cache, v_cache, block_ids, 3, 0.125, out[:, :4])
