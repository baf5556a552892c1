"""Each CUDA kernel against its torch reference on a real GPU, on fresh random inputs.

Outputs are filled with NaN before each run so unwritten elements show; bf16 results must
be within 1e-2 relative error (max |error| / max |reference|), fp16 within 5e-3.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import (
    check_decode,
    check_decode_needles,
    check_fused_add_rms_norm,
    check_prefill,
    check_reshape_and_cache,
    check_rotary,
    check_silu_and_mul,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (none found)"),
]
DTYPES = [torch.bfloat16, torch.float16]
GQA = [(8, 8), (16, 4), (32, 4)]  # query heads / KV heads: ratios 1, 4, 8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), GQA)
@pytest.mark.parametrize(
    ("lens", "block_size"),
    [
        ([1, 17, 100, 255], 16),  # short contexts, one partition
        ([3000, 1, 777, 4097, 0], 16),  # split along the sequence; an empty context
        ([33] * 64, 32),  # a decode batch
    ],
)
def test_decode(dtype, head_dim, num_q_heads, num_kv_heads, lens, block_size):
    check_decode("cuda", dtype, lens, num_q_heads, num_kv_heads, head_dim, block_size)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_at_partition_boundaries(head_dim):
    needles = [0, 15, 16, 127, 128, 255, 256, 511, 512, 1023, 1024, 4095, 4096, 5000]
    check_decode_needles("cuda", torch.bfloat16, 5001, needles, 8, 1, head_dim, 16)


def test_decode_with_gqa_3_and_odd_head_dim():
    check_decode("cuda", torch.bfloat16, [5, 900, 2100], 9, 3, 64, 16)  # SmolLM2-135M
    check_decode("cuda", torch.bfloat16, [5, 900, 2100], 12, 2, 96, 16)  # GQA 6, head_dim 96


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), GQA)
@pytest.mark.parametrize(
    ("q_lens", "ctx_lens"),
    [
        ([200, 1, 65, 17], [200, 1, 65, 17]),  # plain prefill
        ([100, 37, 1, 64], [1000, 37, 513, 64]),  # chunked prefill over cached prefixes
    ],
)
def test_prefill(dtype, head_dim, num_q_heads, num_kv_heads, q_lens, ctx_lens):
    check_prefill("cuda", dtype, q_lens, ctx_lens, num_q_heads, num_kv_heads, head_dim, 16)


def test_prefill_long_and_gqa_3():
    check_prefill("cuda", torch.bfloat16, [2048], [3000], 9, 3, 64, 16)
    check_prefill("cuda", torch.bfloat16, [300, 5], [300, 700], 16, 2, 256, 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_kv_heads", "head_dim"), [(3, 64), (8, 128)])
def test_reshape_and_cache(dtype, num_kv_heads, head_dim):
    check_reshape_and_cache("cuda", dtype, 1000, num_kv_heads * 3, num_kv_heads, head_dim, 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 4096, 8200])
def test_fused_add_rms_norm(dtype, hidden):
    check_fused_add_rms_norm("cuda", dtype, 333, hidden)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "head_dim", "rot_dim"),
    [(9, 3, 64, 64), (32, 8, 128, 128), (8, 2, 128, 64)],
)
def test_rotary(dtype, num_q_heads, num_kv_heads, head_dim, rot_dim):
    check_rotary("cuda", dtype, 517, num_q_heads, num_kv_heads, head_dim, rot_dim)
    check_rotary("cuda", dtype, 9, num_q_heads, num_kv_heads, head_dim, rot_dim, True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [1536, 14336])
def test_silu_and_mul(dtype, inter):
    check_silu_and_mul("cuda", dtype, 257, inter)


def test_kernels_run_on_the_current_stream_and_in_a_cuda_graph():
    """Launches go to torch's current stream, so a captured graph replays them."""
    from kernels_cuda import ops

    x = torch.randn(64, 2 * 1024, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(64, 1024, dtype=torch.bfloat16, device="cuda")
    ops.silu_and_mul(out, x)  # compile and load outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        ops.silu_and_mul(out, x)
    torch.cuda.current_stream().wait_stream(stream)
    x.copy_(torch.randn_like(x))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    expected = torch.nn.functional.silu(x[:, :1024].float()) * x[:, 1024:].float()
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
