"""kernels_cpu's in-place paged decode attention against the gather + SDPA torch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels_cpu import ops

pytestmark = pytest.mark.skipif(not ops.available(), reason="no C++ compiler on this machine")


def reference(q, k_cache, v_cache, block_ids, bias):
    rows, heads, hd = q.shape
    kvh = k_cache.shape[2]
    k = k_cache.index_select(0, block_ids).view(rows, -1, kvh, hd)
    v = v_cache.index_select(0, block_ids).view(rows, -1, kvh, hd)
    o = F.scaled_dot_product_attention(
        q.view(rows, kvh, heads // kvh, hd),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=bias.view(rows, 1, 1, -1),
    )
    return o.reshape(rows, heads, hd)


def make_case(g, heads, kv_heads, head_dim, block_size, num_blocks, context, dtype=None):
    """Random pools, one block table a row (shuffled blocks) and the mask of each row's
    context lengths: (q, k_cache, v_cache, block_ids, bias)."""
    rows = len(context)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    if dtype is not None:
        k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
    width = int(-(-context.max() // block_size))
    tables = torch.randperm(num_blocks, generator=g)[: rows * width].view(rows, width)
    pad = torch.arange(width * block_size)[None, :] >= torch.from_numpy(context)[:, None]
    bias = torch.zeros(rows, width * block_size).masked_fill_(pad, float("-inf"))
    q = torch.randn(rows, heads, head_dim, generator=g)
    return q, k_cache, v_cache, tables.reshape(-1).contiguous(), bias


# Group sizes 3, 1, 4, 6 and 8 (the vector kernels' value tiles of 4, 2 and 1 vectors; 8: the
# 8-lane kernel on an AVX-512 build too), head_dims that leave a part tile (32, 48, 40: the
# 8-lane kernel), and one that is not a multiple of 8 (the scalar path).
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim",
    [(9, 3, 64), (4, 4, 32), (8, 2, 48), (12, 2, 64), (8, 1, 64), (4, 4, 40), (8, 2, 20)],
)
@pytest.mark.parametrize("block_size", [16, 4])
def test_decode_attention_reads_the_cache_in_place_like_gather_then_sdpa(
    library, heads, kv_heads, head_dim, block_size
):
    g = torch.Generator().manual_seed(heads * block_size + head_dim)
    context = np.array([1, block_size, 3 * block_size + 1, 7, 2 * block_size])
    q, k_cache, v_cache, ids, bias = make_case(
        g, heads, kv_heads, head_dim, block_size, 40, context
    )
    got = ops.paged_decode_attention(q, k_cache, v_cache, ids, bias, head_dim**-0.5)
    torch.testing.assert_close(got, reference(q, k_cache, v_cache, ids, bias), atol=2e-6, rtol=1e-5)


def test_decode_attention_refuses_bad_inputs_by_name():
    k = torch.zeros(4, 16, 2, 8)
    ids, bias = torch.zeros(2, dtype=torch.int64), torch.zeros(2, 16)
    with pytest.raises(ValueError, match="multiple of 2 KV heads"):
        ops.paged_decode_attention(torch.zeros(2, 3, 8), k, k, ids, bias, 1.0)
    with pytest.raises(ValueError, match="block_ids"):
        ops.paged_decode_attention(torch.zeros(2, 4, 8), k, k, ids.int(), bias, 1.0)


def rounded_q(q, k_cache, heads, kv_heads, head_dim):
    """The queries the kernel's scores see: rounded to bf16 where AMX tiles or vdpbf16ps
    score a bf16 pool's keys (decode_attention_bf16_products), else as they are."""
    tiles = k_cache.dtype == torch.bfloat16 and ops.decode_attention_bf16_products(
        heads, kv_heads, head_dim
    )
    return q.bfloat16().float() if tiles else q


def test_decode_attention_scores_in_bf16_for_the_shapes_that_fit(library):
    """A bf16 pool's keys are scored in bf16 where the build can: on AMX tiles where it has
    them and the shape fits (up to 16 query heads, 6 a KV head, head_dim % 32 == 0, the KV
    heads' dims in 6 tiles of 32), else by vdpbf16ps on an AVX512-BF16 build (up to 6 query
    heads a KV head, head_dim % 32 == 0); each switch turns its path off."""
    amx, dot = ops.bf16_amx(), ops.bf16_dot_scores()
    assert dot == (ops.has_bf16_gemm() and not amx)
    for heads, kv_heads, head_dim, tiles, vector in [
        (9, 3, 64, True, True),
        (12, 2, 64, True, True),
        (16, 4, 32, True, True),
        (6, 1, 128, True, True),
        (8, 1, 64, False, False),  # 8 query heads a KV head
        (16, 4, 64, False, True),  # 256 dims of KV heads: too many for the tiles
        (8, 2, 48, False, False),  # head_dim % 32
        (32, 8, 128, False, True),
    ]:
        expected = (amx and tiles) or (dot and vector)
        assert ops.decode_attention_bf16_products(heads, kv_heads, head_dim) == expected
    try:
        if amx:  # tiles off: vdpbf16ps takes the scores
            ops.bf16_amx(False)
            assert ops.bf16_dot_scores() and ops.decode_attention_bf16_products(9, 3, 64)
        ops.bf16_dot_scores(False)
        assert not ops.decode_attention_bf16_products(9, 3, 64)
    finally:
        ops.bf16_amx(amx)
        ops.bf16_dot_scores(True)
    assert ops.bf16_dot_scores() == dot


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim",
    [(9, 3, 64), (12, 2, 64), (8, 1, 64), (4, 4, 40), (16, 4, 32), (6, 1, 128)],
)
@pytest.mark.parametrize("block_size", [16, 4])
@pytest.mark.parametrize("scores", ["default", "amx-off", "fp32"])
def test_decode_attention_over_bf16_pools_is_the_fp32_math_on_the_rounded_values(
    library, heads, kv_heads, head_dim, block_size, scores
):
    """The fp32 math on the pool's bf16 values; where the keys are scored in bf16 (AMX tiles
    or vdpbf16ps), on the queries rounded to bf16 too. amx-off: the tiles switched off (the
    vdpbf16ps path that AVX512-BF16 CPUs without AMX run); fp32: both switched off (the path
    of AVX-512 CPUs without bf16). Block size 4: tiles of 16 keys across blocks (the kernel
    gathers them first); contexts off the 16-key tiles."""
    if not ops.bf16_attention_supported(heads, kv_heads, head_dim):
        pytest.skip("the scalar build reads fp32 pools only")
    amx = ops.bf16_amx()
    if scores == "amx-off" and not amx:
        pytest.skip("no AMX tiles to switch off")
    if scores == "fp32" and not ops.decode_attention_bf16_products(heads, kv_heads, head_dim):
        pytest.skip("this case's scores are fp32 already")
    if scores != "default":
        ops.bf16_amx(False)
    if scores == "fp32":
        ops.bf16_dot_scores(False)
    try:
        g = torch.Generator().manual_seed(heads + head_dim)
        num_blocks, rows = 30 * 16 // block_size, 4
        k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).bfloat16()
        v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).bfloat16()
        context = np.array([1, 17, 40, 64])
        width = 64 // block_size
        tables = torch.randperm(num_blocks, generator=g)[: rows * width].view(rows, width)
        pad = torch.arange(width * block_size)[None, :] >= torch.from_numpy(context)[:, None]
        bias = torch.zeros(rows, width * block_size).masked_fill_(pad, float("-inf"))
        q = torch.randn(rows, heads, head_dim, generator=g)
        ids = tables.reshape(-1).contiguous()
        got = ops.paged_decode_attention(q, k_cache, v_cache, ids, bias, head_dim**-0.5)
        q_seen = rounded_q(q, k_cache, heads, kv_heads, head_dim)
        ref = reference(q_seen, k_cache.float(), v_cache.float(), ids, bias)
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
        if scores == "fp32":  # the queries as they are
            assert not ops.decode_attention_bf16_products(heads, kv_heads, head_dim)
            ref = reference(q, k_cache.float(), v_cache.float(), ids, bias)
            torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    finally:
        ops.bf16_amx(amx)
        ops.bf16_dot_scores(True)
    with pytest.raises(ValueError, match="k_cache is torch.float32 but v_cache torch.bfloat16"):
        ops.paged_decode_attention(q, k_cache.float(), v_cache, ids, bias, 1.0)


def test_decode_attention_refuses_a_bf16_pool_of_a_shape_its_vector_path_lacks(library):
    k = torch.zeros(4, 16, 2, 20, dtype=torch.bfloat16)  # head_dim 20: the fp32 loops only
    ids, bias = torch.zeros(2, dtype=torch.int64), torch.zeros(2, 16)
    assert not ops.bf16_attention_supported(4, 2, 20)
    with pytest.raises(ValueError, match="bf16 cache takes head_dim % 8 == 0"):
        ops.paged_decode_attention(torch.zeros(2, 4, 20), k, k, ids, bias, 1.0)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_is_the_same_however_threads_split_rows_and_kv_heads(
    library, threads, rows, dtype
):
    """Threads take whole rows (a row's KV heads in one task) or, with fewer rows than
    threads, single KV heads of a row: either way the reference's result."""
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    if dtype == torch.bfloat16 and not ops.bf16_attention_supported(heads, kv_heads, head_dim):
        pytest.skip("the scalar build reads fp32 pools only")
    g = torch.Generator().manual_seed(rows * 10 + threads)
    context = np.array([300, 3, 33, 16, 101])[:rows]  # 2+ rows: over 512 pairs, threaded
    q, k_cache, v_cache, ids, bias = make_case(
        g, heads, kv_heads, head_dim, block_size, 100, context, dtype
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = ops.paged_decode_attention(q, k_cache, v_cache, ids, bias, head_dim**-0.5)
    finally:
        torch.set_num_threads(before)
    q_seen = rounded_q(q, k_cache, heads, kv_heads, head_dim)
    ref = reference(q_seen, k_cache.float(), v_cache.float(), ids, bias)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("context", [63, 64, 65, 130, 301])
def test_one_row_is_split_in_key_ranges_and_merged_the_same_for_any_thread_count(
    library, dtype, context
):
    """A single row of 64 keys or more is attended in two key ranges, merged by their softmax
    maxima and sums (so 2 threads share one row's keys, not its 3 KV heads): the reference's
    result, and bit for bit the same with 1, 2 or 3 threads."""
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    if dtype == torch.bfloat16 and not ops.bf16_attention_supported(heads, kv_heads, head_dim):
        pytest.skip("the scalar build reads fp32 pools only")
    g = torch.Generator().manual_seed(context)
    q, k_cache, v_cache, ids, bias = make_case(
        g, heads, kv_heads, head_dim, block_size, 40, np.array([context]), dtype
    )
    q = q * 3  # peaked softmaxes: the two ranges' maxima differ
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(ops.paged_decode_attention(q, k_cache, v_cache, ids, bias, head_dim**-0.5))
    finally:
        torch.set_num_threads(before)
    q_seen = rounded_q(q, k_cache, heads, kv_heads, head_dim)
    ref = reference(q_seen, k_cache.float(), v_cache.float(), ids, bias)
    # atol 1e-5: scores 3x the other tests' (exp's rounding grows with them, on every build)
    torch.testing.assert_close(outs[0], ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
