"""kernels_cpu's fused small ops (add + RMSNorm, RoPE, SwiGLU) against their torch versions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine_core.models.layers import apply_rope
from engine_core.models.ops import NATIVE_OPS
from kernels_cpu import ops

pytestmark = pytest.mark.skipif(not ops.available(), reason="no C++ compiler on this machine")


@pytest.mark.parametrize("rows,h", [(1, 576), (5, 100), (70, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_torch(library, rows, h, with_residual):
    g = torch.Generator().manual_seed(rows * h)
    x, res = torch.randn(rows, h, generator=g) * 3, torch.randn(rows, h, generator=g)
    w = torch.randn(h, generator=g)
    out, new_res = ops.add_rms_norm(x, res if with_residual else None, w, 1e-5)
    want_res = x + res if with_residual else x
    assert torch.equal(new_res, want_res)
    torch.testing.assert_close(out, F.rms_norm(want_res, (h,), w, 1e-5), rtol=2e-6, atol=2e-6)


def test_rope_rotates_a_strided_view_in_place(library):
    tokens, heads, hd = 7, 5, 64
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(tokens, (heads + 2) * hd, generator=g)
    qk = qkv[:, : heads * hd].view(tokens, heads, hd)  # row stride of the whole qkv
    angles = torch.rand(tokens, 1, hd // 2, generator=g) * 10
    cos, sin = angles.cos(), angles.sin()
    want = apply_rope(qk.clone(), cos, sin)
    v_before = qkv[:, heads * hd :].clone()
    got = ops.rope_(qk, cos, sin)
    assert got.data_ptr() == qkv.data_ptr()
    torch.testing.assert_close(qk, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[:, heads * hd :], v_before)  # v untouched


@pytest.mark.parametrize("tokens,n", [(1, 1536), (3, 20), (40, 128)])
def test_silu_and_mul_matches_torch(library, tokens, n):
    x = torch.randn(tokens, 2 * n, generator=torch.Generator().manual_seed(n)) * 6
    x[0, :4] = torch.tensor([-120.0, 95.0, 0.0, -0.0])  # exp's clamps, both zeros
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_and_mul(x), F.silu(gate) * up, rtol=2e-6, atol=1e-6)


def test_native_ops_use_the_kernels_for_fp32_and_torch_otherwise():
    x, w = torch.randn(3, 64), torch.randn(64)
    got, _ = NATIVE_OPS.rms_norm(x, None, w, 1e-6)
    torch.testing.assert_close(got, F.rms_norm(x, (64,), w, 1e-6))
    xb = x.bfloat16()
    out, res = NATIVE_OPS.rms_norm(xb, xb, w.bfloat16(), 1e-6)  # torch's path: bf16 in, out
    assert out.dtype == torch.bfloat16 and torch.equal(res, xb + xb)
    wide = torch.randn(3, 128)
    torch.testing.assert_close(
        NATIVE_OPS.silu_and_mul(wide[:, ::2]), F.silu(wide[:, :64:2]) * wide[:, 64::2]
    )


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="float32"):
        ops.silu_and_mul(torch.randn(2, 8).double())
    with pytest.raises(ValueError, match="shapes"):
        ops.add_rms_norm(torch.randn(2, 8), None, torch.randn(9), 1e-6)
    with pytest.raises(ValueError, match="cos/sin"):
        ops.rope_(torch.randn(2, 3, 8), torch.randn(2, 3), torch.randn(2, 4))
