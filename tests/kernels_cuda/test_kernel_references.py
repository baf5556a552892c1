"""The torch references (CPU path and oracle) against naive loops on small shapes."""

from __future__ import annotations

import math

import pytest
import torch
from paged_inputs import cu_seqlens, make_paged_kv

from kernels_cuda import reference


def naive_attention(q, k, v, scale, query_positions):
    """Loops: q [Lq, Hq, D], k/v [Lk, Hkv, D]; row i sees keys 0..query_positions[i]."""
    lq, hq, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(lq, hq, d, dtype=torch.float64)
    for i in range(lq):
        for h in range(hq):
            kvh = h // group
            keys = range(query_positions[i] + 1)
            scores = [float(q[i, h].double() @ k[t, kvh].double()) * scale for t in keys]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights)
            for t, w in zip(keys, weights, strict=True):
                out[i, h] += w / total * v[t, kvh].double()
    return out


@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(2, 2), (4, 1), (6, 3)])
def test_paged_decode_matches_dense_attention_over_unpaged_kv(num_q_heads, num_kv_heads):
    lens = [1, 7, 16, 21]
    head_dim, block_size = 8, 4
    kv = make_paged_kv(lens, num_kv_heads, head_dim, block_size, seed=1)
    query = torch.randn(
        len(lens), num_q_heads, head_dim, generator=torch.Generator().manual_seed(2)
    )
    out = torch.full_like(query, float("nan"))
    scale = 0.3
    reference.paged_attention_decode(
        out, query, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale
    )
    for s, n in enumerate(lens):
        expected = naive_attention(query[s : s + 1], kv.dense_k[s], kv.dense_v[s], scale, [n - 1])
        torch.testing.assert_close(out[s].double(), expected[0], rtol=1e-5, atol=1e-5)


def test_paged_decode_gives_zeros_for_an_empty_context():
    kv = make_paged_kv([0, 5], 1, 8, 4)
    query = torch.randn(2, 1, 8)
    out = torch.full_like(query, float("nan"))
    reference.paged_attention_decode(
        out, query, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 1.0
    )
    assert torch.equal(out[0], torch.zeros(1, 8))
    assert torch.isfinite(out[1]).all()


def test_paged_prefill_with_cached_prefix_matches_causal_loops():
    # Sequence 0: plain prefill; 1: chunk after a 9-token prefix; 2: a decode-like single token.
    q_lens, ctx_lens = [6, 5, 1], [6, 14, 11]
    num_q_heads, num_kv_heads, head_dim = 4, 2, 8
    kv = make_paged_kv(ctx_lens, num_kv_heads, head_dim, block_size=4, seed=3)
    cu = cu_seqlens(q_lens)
    query = torch.randn(
        sum(q_lens), num_q_heads, head_dim, generator=torch.Generator().manual_seed(4)
    )
    out = torch.full_like(query, float("nan"))
    reference.paged_attention_prefill(
        out, query, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.context_lens, 0.5, max(q_lens)
    )
    for s, (q_len, ctx) in enumerate(zip(q_lens, ctx_lens, strict=True)):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        positions = [ctx - q_len + i for i in range(q_len)]
        expected = naive_attention(query[rows], kv.dense_k[s], kv.dense_v[s], 0.5, positions)
        torch.testing.assert_close(out[rows].double(), expected, rtol=1e-5, atol=1e-5)


def test_prefill_of_one_token_equals_decode():
    kv = make_paged_kv([9, 3], 2, 8, 4, seed=5)
    query = torch.randn(2, 4, 8)
    decode = reference.paged_attention_decode(
        torch.empty_like(query),
        query,
        kv.k_cache,
        kv.v_cache,
        kv.block_tables,
        kv.context_lens,
        0.7,
    )
    prefill = reference.paged_attention_prefill(
        torch.empty_like(query),
        query,
        kv.k_cache,
        kv.v_cache,
        kv.block_tables,
        cu_seqlens([1, 1]),
        kv.context_lens,
        0.7,
        1,
    )
    torch.testing.assert_close(prefill, decode)


def test_prefill_rejects_more_new_tokens_than_context():
    kv = make_paged_kv([3], 1, 8, 4)
    query = torch.randn(4, 1, 8)
    with pytest.raises(ValueError, match="4 new tokens but context length 3"):
        reference.paged_attention_prefill(
            torch.empty_like(query),
            query,
            kv.k_cache,
            kv.v_cache,
            kv.block_tables,
            cu_seqlens([4]),
            kv.context_lens,
            1.0,
            4,
        )


def test_reshape_and_cache_writes_each_token_at_its_slot_and_skips_padding():
    num_blocks, block_size, heads, dim = 3, 4, 2, 8
    k_cache = torch.zeros(num_blocks, block_size, heads, dim)
    v_cache = torch.zeros_like(k_cache)
    key, value = torch.randn(3, heads, dim), torch.randn(3, heads, dim)
    slots = torch.tensor([9, -1, 2])  # block 2 offset 1; padding; block 0 offset 2
    reference.reshape_and_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache[2, 1], key[0]) and torch.equal(v_cache[2, 1], value[0])
    assert torch.equal(k_cache[0, 2], key[2]) and torch.equal(v_cache[0, 2], value[2])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 2  # nothing else written


def test_reshape_and_cache_rejects_out_of_range_slots():
    cache = torch.zeros(2, 4, 1, 8)
    with pytest.raises(ValueError, match=r"\[8\]"):
        reference.reshape_and_cache(
            torch.ones(1, 1, 8), torch.ones(1, 1, 8), cache, cache.clone(), torch.tensor([8])
        )


def test_rms_norm_and_fused_add_match_loops():
    x = torch.randn(3, 16, dtype=torch.float64)
    residual = torch.randn(3, 16, dtype=torch.float64)
    weight = torch.randn(16, dtype=torch.float64)
    eps = 1e-6
    expected_res = x + residual
    expected = torch.empty_like(x)
    for t in range(3):
        row = expected_res[t]
        rms = math.sqrt(sum(float(v) ** 2 for v in row) / 16 + eps)
        for i in range(16):
            expected[t, i] = float(row[i]) / rms * float(weight[i])
    x_in, res_in = x.float(), residual.float()
    reference.fused_add_rms_norm(x_in, res_in, weight.float(), eps)
    torch.testing.assert_close(res_in.double(), expected_res, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_in.double(), expected, rtol=1e-5, atol=1e-5)
    plain = reference.rms_norm(torch.empty(3, 16), expected_res.float(), weight.float(), eps)
    torch.testing.assert_close(plain.double(), expected, rtol=1e-5, atol=1e-5)


def test_rotary_matches_rotate_half_loops_and_leaves_unrotated_dims():
    head_dim, rot_dim, max_pos = 8, 6, 32
    cos, sin = reference.cos_sin_cache(rot_dim, max_pos, base=100.0)
    positions = torch.tensor([0, 5, 31])
    query = torch.randn(3, 2 * head_dim)  # [T, heads * head_dim] layout
    key = torch.randn(3, 1, head_dim)
    q0, k0 = query.clone(), key.clone()
    reference.rotary_embedding(positions, query, key, cos, sin, head_dim)
    half = rot_dim // 2
    for x_before, x_after in ((q0.view(3, 2, head_dim), query.view(3, 2, head_dim)), (k0, key)):
        for t, pos in enumerate(positions.tolist()):
            for h in range(x_before.shape[1]):
                for i in range(half):
                    angle = pos / 100.0 ** (2 * i / rot_dim)
                    a, b = float(x_before[t, h, i]), float(x_before[t, h, i + half])
                    assert x_after[t, h, i] == pytest.approx(
                        a * math.cos(angle) - b * math.sin(angle), abs=1e-5
                    )
                    assert x_after[t, h, i + half] == pytest.approx(
                        b * math.cos(angle) + a * math.sin(angle), abs=1e-5
                    )
                assert torch.equal(x_after[t, h, rot_dim:], x_before[t, h, rot_dim:])


def test_rotary_accepts_the_concatenated_cos_sin_layout():
    cos, sin = reference.cos_sin_cache(8, 16)
    positions = torch.tensor([3, 7])
    a, b = torch.randn(2, 2, 8), None
    a2 = a.clone()
    reference.rotary_embedding(positions, a, b, cos, sin, 8)
    reference.rotary_embedding(positions, a2, None, torch.cat([cos, sin], dim=1), None, 8)
    assert torch.equal(a, a2)


def test_rotary_rejects_positions_past_the_cache():
    cos, sin = reference.cos_sin_cache(8, 16)
    with pytest.raises(ValueError, match="max 16"):
        reference.rotary_embedding(torch.tensor([16]), torch.randn(1, 8), None, cos, sin, 8)


def test_silu_and_mul_matches_loops():
    x = torch.randn(2, 6)
    out = reference.silu_and_mul(torch.empty(2, 3), x)
    for t in range(2):
        for i in range(3):
            g, u = float(x[t, i]), float(x[t, i + 3])
            assert out[t, i] == pytest.approx(g / (1 + math.exp(-g)) * u, rel=1e-5, abs=1e-6)
