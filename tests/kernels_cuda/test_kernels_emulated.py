"""The CUDA kernels' own source, run on a CPU emulator through ops' real launch code.

Without a GPU this is what checks the kernels' indexing, synchronization, split-K merge and
masking; tests/kernels_cuda/test_kernels_gpu.py runs the same checks on a real GPU. The
emulated "GPU" has 4 SMs, so modest contexts already take the split-K decode path.
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

pytestmark = pytest.mark.slow  # each kernel module is compiled by g++ once per run (cached)


@pytest.fixture(autouse=True)
def _route_ops_to_emulator(emulated_ops):
    return emulated_ops


@pytest.mark.parametrize(
    ("lens", "num_q_heads", "num_kv_heads", "block_size"),
    [
        ([1, 17, 40], 4, 4, 16),  # GQA 1, contexts not multiples of the block size
        ([33, 700, 5], 9, 3, 16),  # GQA 3 (the default model's), split along the sequence
        ([300, 1], 8, 2, 32),  # GQA 4
        ([129, 64], 16, 2, 16),  # GQA 8
        ([1300, 0, 2], 16, 1, 16),  # GQA 16: two head chunks; an empty context gives zeros
    ],
)
def test_decode_kernel_matches_reference_bf16_head_dim_64(
    lens, num_q_heads, num_kv_heads, block_size
):
    check_decode("cpu", torch.bfloat16, lens, num_q_heads, num_kv_heads, 64, block_size)


def test_decode_kernel_head_dim_128_split_and_unsplit():
    check_decode("cpu", torch.bfloat16, [1000, 3], 8, 1, 128, 16)
    # A host-side bound on the context removes the split entirely.
    check_decode("cpu", torch.bfloat16, [100, 3], 8, 1, 128, 16, max_context_len=100)


def test_decode_kernel_sees_every_token_at_block_and_partition_boundaries():
    # 1100 tokens on this 4-SM "GPU" split into partitions of 512: needles on both sides of
    # each partition and block boundary, and at both ends.
    needles = [0, 15, 16, 511, 512, 1023, 1024, 1099]
    check_decode_needles("cpu", torch.bfloat16, 1100, needles, 4, 2, 64, 16)


def test_decode_kernel_fp16():
    check_decode("cpu", torch.float16, [77, 530], 8, 2, 64, 16)


@pytest.mark.parametrize(
    ("q_lens", "ctx_lens", "num_q_heads", "num_kv_heads"),
    [
        ([70, 1, 20], [70, 1, 20], 2, 2),  # plain prefill, GQA 1, several row tiles
        ([33, 5, 1], [33, 100, 12], 9, 3),  # chunked prefill over cached prefixes, GQA 3
        ([40], [170], 8, 2),  # GQA 4: several K/V tiles
        ([9, 3], [9, 67], 16, 2),  # GQA 8
    ],
)
def test_prefill_kernel_matches_reference_bf16_head_dim_64(
    q_lens, ctx_lens, num_q_heads, num_kv_heads
):
    check_prefill("cpu", torch.bfloat16, q_lens, ctx_lens, num_q_heads, num_kv_heads, 64, 16)


def test_prefill_kernel_head_dim_128_and_fp16():
    check_prefill("cpu", torch.bfloat16, [20, 7], [85, 7], 8, 1, 128, 32)
    check_prefill("cpu", torch.float16, [30], [95], 4, 2, 64, 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reshape_and_cache_kernel_writes_exactly_the_reference_slots(dtype):
    check_reshape_and_cache("cpu", dtype, 37, 4, 2, 64, 16)
    check_reshape_and_cache("cpu", dtype, 5, 9, 3, 64, 8, seed=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_kernels_match_reference(dtype):
    check_fused_add_rms_norm("cpu", dtype, 5, 576)  # SmolLM2-135M's hidden size
    check_fused_add_rms_norm("cpu", dtype, 2, 8192 * 2)  # several vectors per thread


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_kernel_matches_reference(dtype):
    check_rotary("cpu", dtype, 7, 9, 3, 64, 64)
    check_rotary("cpu", dtype, 3, 4, 1, 128, 64, concatenated_cache=True)  # partial rotary


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_and_mul_kernel_matches_reference(dtype):
    check_silu_and_mul("cpu", dtype, 3, 1536)
    check_silu_and_mul("cpu", dtype, 2, 8)


def test_emulator_reports_a_barrier_not_all_threads_reach(emulator):
    source = """
    extern "C" __global__ void divergent(float* x) {
      if (threadIdx.x < 32) __syncthreads();
      x[threadIdx.x] = 1.f;
    }"""
    lib = emulator.build_source("divergent", source, [])
    kernel = _kernel_from(lib, "divergent")
    x = torch.zeros(64)
    with pytest.raises(RuntimeError, match="__syncthreads reached by 32 threads while 32 exited"):
        kernel.launch((1, 1, 1), (64, 1, 1), [_ptr(x)])


def test_emulator_reports_writes_past_dynamic_shared_memory(emulator):
    source = """
    extern "C" __global__ void overflow(float* x) {
      RS_DYNAMIC_SMEM(smem);
      reinterpret_cast<float*>(smem)[threadIdx.x] = x[threadIdx.x];
    }"""
    kernel = _kernel_from(emulator.build_source("overflow", source, []), "overflow")
    x = torch.ones(32)
    kernel.launch((1, 1, 1), (32, 1, 1), [_ptr(x)], shared_mem=128)
    with pytest.raises(RuntimeError, match="past the 64 launched"):
        kernel.launch((1, 1, 1), (32, 1, 1), [_ptr(x)], shared_mem=64)


def _kernel_from(lib, name):
    from kernel_emulator import EmuKernel

    return EmuKernel(lib, name)


def _ptr(t):
    import ctypes

    return ctypes.c_void_p(t.data_ptr())


@pytest.mark.parametrize("seed", range(3))
def test_decode_and_prefill_on_random_shapes(seed):
    rng = torch.Generator().manual_seed(100 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    num_kv_heads = pick([1, 2, 3])
    num_q_heads = num_kv_heads * pick([1, 2, 3, 4, 5, 8])
    block_size = pick([8, 16, 32])
    num_seqs = pick([1, 2, 3])
    ctx_lens = [int(n) for n in torch.randint(1, 600, (num_seqs,), generator=rng)]
    q_lens = [max(1, int(n * float(torch.rand(1, generator=rng)))) for n in ctx_lens]
    q_lens = [min(q, 80) for q in q_lens]
    args = (num_q_heads, num_kv_heads, 64, block_size)
    check_decode("cpu", torch.bfloat16, ctx_lens, *args, seed=seed)
    check_prefill("cpu", torch.bfloat16, q_lens, ctx_lens, *args, seed=seed)
