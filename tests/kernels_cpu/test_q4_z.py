"""kernels_cpu's Q4_Z blocks (4 bits, fp16 scale, integer zero point: AWQ/GPTQ groups)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_core.models.hf_quant import q4_z_blocks
from kernels_cpu import ops

pytestmark = pytest.mark.skipif(not ops.available(), reason="no C++ compiler on this machine")


def random_q4_z(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random Q4_Z blocks of W [n, k] and their values (q - z) * d, computed in float64."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    d = (torch.rand(n, k // 32, generator=g) * 0.02 + 1e-4).to(torch.float16)
    z = torch.randint(0, 17, (n, k // 32), generator=g, dtype=torch.int32)  # 16: GPTQ v1's top
    zf = z.double().repeat_interleave(32, dim=1)
    w = (q.double() - zf) * d.double().repeat_interleave(32, dim=1)
    return q4_z_blocks(q, d, z), w


def test_dequantize_is_bit_exact(library) -> None:
    blocks, w = random_q4_z(48, 256, seed=0)
    got = ops.dequantize(blocks, ops.Q4_Z, 48, 256)
    # (q - z) * d has at most 16 significant bits: fp32 holds it exactly.
    assert torch.equal(got.double(), w)
    rows = torch.tensor([5, 0, 47, 5])
    assert torch.equal(ops.dequantize(blocks, ops.Q4_Z, 48, 256, rows=rows).double(), w[rows])


@pytest.mark.parametrize("n,k", [(16, 32), (192, 576), (100, 1536)])
@pytest.mark.parametrize("m", [1, 3, 8, 33])
def test_gemm_matches_dequantize_then_matmul(library, n: int, k: int, m: int) -> None:
    blocks, w = random_q4_z(n, k, seed=n + k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    ref = x.double() @ w.T
    scale = float(ref.abs().max()) + 1e-6
    err = (ops.gemm(x, blocks, ops.Q4_Z, n, k).double() - ref).abs().max().item()
    assert err / scale < 5e-6
    # The int8-activation kernel takes the same blocks: within int8 rounding of the product.
    y = ops.gemm(x, blocks, ops.Q4_Z, n, k, int8_activations=True).double()
    assert float(np.linalg.norm(y - ref) / np.linalg.norm(ref)) < 0.01


def test_wrong_size_is_refused() -> None:
    blocks, _ = random_q4_z(4, 64, seed=1)
    with pytest.raises(ValueError, match="bytes"):
        ops.dequantize(blocks[:-1], ops.Q4_Z, 4, 64)
