"""kernels_cuda.ops: CPU tensors go to the references; bad inputs get errors naming them."""

from __future__ import annotations

import math

import pytest
import torch
from paged_inputs import cu_seqlens, make_paged_kv

from kernels_cuda import launch, ops, reference


def decode_args(lens=(5, 9), num_q_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32):
    kv = make_paged_kv(list(lens), num_kv_heads, head_dim, 4, dtype)
    query = torch.randn(len(lens), num_q_heads, head_dim).to(dtype)
    return [
        torch.empty_like(query),
        query,
        kv.k_cache,
        kv.v_cache,
        kv.block_tables,
        kv.context_lens,
        1 / math.sqrt(head_dim),
    ]


def test_cpu_tensors_run_the_reference():
    args = decode_args()
    out = ops.paged_attention_decode(*args)
    expected = reference.paged_attention_decode(torch.empty_like(args[0]), *args[1:])
    assert out is args[0]
    assert torch.equal(out, expected)

    x = torch.randn(3, 16)
    residual, weight = torch.randn(3, 16), torch.randn(16)
    x2, r2 = x.clone(), residual.clone()
    ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    reference.fused_add_rms_norm(x2, r2, weight, 1e-6)
    assert torch.equal(x, x2) and torch.equal(residual, r2)


def test_prefill_on_cpu_matches_decode_for_single_tokens():
    out, query, k_cache, v_cache, tables, lens, scale = decode_args()
    decode = ops.paged_attention_decode(out.clone(), query, k_cache, v_cache, tables, lens, scale)
    prefill = ops.paged_attention_prefill(
        out.clone(), query, k_cache, v_cache, tables, cu_seqlens([1, 1]), lens, scale, 1
    )
    torch.testing.assert_close(prefill, decode)


def test_norm_accepts_leading_batch_dims_and_in_place_output():
    x = torch.randn(2, 3, 16)
    weight = torch.randn(16)
    expected = reference.rms_norm(torch.empty(6, 16), x.view(6, 16), weight, 1e-5)
    ops.rms_norm(x, x, weight, 1e-5)
    torch.testing.assert_close(x.view(6, 16), expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.__setitem__(4, a[4].long()), "block_tables must be int32"),
        (lambda a: a.__setitem__(5, a[5].long()), "context_lens must be int32"),
        (lambda a: a.__setitem__(1, torch.randn(2, 3, 16)), "not a multiple of num_kv_heads"),
        (lambda a: a.__setitem__(0, torch.empty(2, 4, 8)), "out"),
        (lambda a: a.__setitem__(3, a[3][:, :2]), "v_cache"),
        (lambda a: a.__setitem__(5, a[5][:1]), r"context_lens must be \[2\]"),
        (lambda a: a.__setitem__(1, a[1].double()), "must match query torch.float64"),
        (
            lambda a: a.__setitem__(slice(0, 2), [a[0].double(), a[1].double()]),
            "query dtype torch.float64 differs from the cache's torch.float32",
        ),
    ],
)
def test_decode_rejects_bad_inputs(change, message):
    args = decode_args()
    change(args)
    with pytest.raises(ValueError, match=message):
        ops.paged_attention_decode(*args)


def test_prefill_rejects_bad_cu_seqlens_and_max_q_len():
    out, query, k_cache, v_cache, tables, lens, scale = decode_args()
    with pytest.raises(ValueError, match="cu_seqlens_q must be 1-D int32"):
        ops.paged_attention_prefill(
            out, query, k_cache, v_cache, tables, cu_seqlens([1, 1]).long(), lens, scale, 1
        )
    with pytest.raises(ValueError, match=r"block_tables must be \[3, max_blocks\]"):
        ops.paged_attention_prefill(
            out, query, k_cache, v_cache, tables, cu_seqlens([1, 0, 1]), lens, scale, 1
        )
    with pytest.raises(ValueError, match="max_q_len must be >= 0"):
        ops.paged_attention_prefill(
            out, query, k_cache, v_cache, tables, cu_seqlens([1, 1]), lens, scale, -1
        )


def test_reshape_and_cache_rejects_bad_inputs():
    cache = torch.zeros(4, 4, 2, 8)
    key = torch.randn(3, 2, 8)
    slots = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="slot_mapping must be 1-D int64"):
        ops.reshape_and_cache(key, key, cache, cache.clone(), slots.int())
    with pytest.raises(ValueError, match=r"key must be \[3, 2, 8\] or \[3, 16\]"):
        ops.reshape_and_cache(torch.randn(3, 4, 8), key, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="differs from the cache's"):
        ops.reshape_and_cache(key.half(), key.half(), cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="different devices"):
        ops.reshape_and_cache(key, key, cache, cache.clone(), slots.to("meta"))
    # [T, Hkv * D] is accepted, as a column slice of a fused qkv projection.
    qkv = torch.randn(3, 48)
    k_cache, v_cache = cache.clone(), cache.clone()
    ops.reshape_and_cache(qkv[:, 16:32], qkv[:, 32:], k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(16, 2, 8)[1], qkv[1, 16:32].view(2, 8))


def test_norm_rotary_and_activation_reject_bad_inputs():
    x, weight = torch.randn(3, 16), torch.randn(16)
    with pytest.raises(ValueError, match="eps must be > 0"):
        ops.fused_add_rms_norm(x, torch.randn(3, 16), weight, 0.0)
    with pytest.raises(ValueError, match="must not share memory"):
        ops.fused_add_rms_norm(x, x, weight, 1e-6)
    with pytest.raises(ValueError, match="weight's size 8"):
        ops.rms_norm(x, x, torch.randn(8), 1e-6)
    cos, sin = reference.cos_sin_cache(16, 8)
    with pytest.raises(ValueError, match="positions must be 1-D int64"):
        ops.rotary_embedding(
            torch.tensor([1], dtype=torch.int32), torch.randn(1, 8), None, cos, sin, 8
        )
    with pytest.raises(ValueError, match=r"rot_dim 16 must be in \(0, head_dim=8\]"):
        ops.rotary_embedding(torch.tensor([1]), torch.randn(1, 8), None, cos, sin, 8)
    with pytest.raises(ValueError, match="float32 tables"):
        ops.rotary_embedding(torch.tensor([1]), torch.randn(1, 16), None, cos.half(), sin, 16)
    with pytest.raises(ValueError, match=r"query must be \[T=2"):
        ops.rotary_embedding(torch.tensor([1, 2]), torch.randn(1, 16), None, cos, sin, 16)
    with pytest.raises(ValueError, match=r"x \[T, 2I\] and out \[T, I\]"):
        ops.silu_and_mul(torch.empty(3, 5), torch.randn(3, 8))


def test_cuda_path_rejects_unaligned_rows_and_float32(monkeypatch):
    """Checked before anything is compiled: routed to the CUDA path without a GPU."""
    monkeypatch.setattr(ops, "_use_cuda", lambda t: True)
    monkeypatch.setattr(launch, "kernel", lambda *a, **k: pytest.fail("validation let it through"))
    out, query, k_cache, v_cache, tables, lens, scale = decode_args(dtype=torch.bfloat16)
    wide = torch.randn(2, 4 * 16 + 1, dtype=torch.bfloat16)
    unaligned = wide[:, 1:].view(2, 4, 16)  # rows start 2 bytes past a 16-byte boundary
    with pytest.raises(ValueError, match="16-byte aligned"):
        ops.paged_attention_decode(out, unaligned, k_cache, v_cache, tables, lens, scale)
    out32, query32, *rest = decode_args(dtype=torch.float32)
    with pytest.raises(ValueError, match="float16 and bfloat16; query is torch.float32"):
        ops.paged_attention_decode(out32, query32, *rest)
    with pytest.raises(ValueError, match="over the kernel's 32768"):
        x = torch.randn(1, 40960, dtype=torch.bfloat16)
        ops.rms_norm(x, x, torch.randn(40960, dtype=torch.bfloat16), 1e-6)
