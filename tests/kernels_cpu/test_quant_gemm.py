"""kernels_cpu's quantized GEMM against dequantize-then-matmul references."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from kernels_cpu import ops

pytestmark = pytest.mark.skipif(not ops.available(), reason="no C++ compiler on this machine")

TYPES = {
    ops.Q4_0: gguf.GGMLQuantizationType.Q4_0,
    ops.Q4_1: gguf.GGMLQuantizationType.Q4_1,
    ops.Q8_0: gguf.GGMLQuantizationType.Q8_0,
}


def quantized_weight(wtype: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Random W [n, k] quantized with gguf's own quantizer: (its blocks, its dequantized values)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    if wtype == ops.Q4_1:
        w += rng.standard_normal((n, 1)).astype(np.float32) * 0.02  # blocks with an offset
    raw = gguf.quants.quantize(w, TYPES[wtype])
    deq = gguf.quants.dequantize(raw, TYPES[wtype]).astype(np.float32).reshape(n, k)
    return torch.from_numpy(np.ascontiguousarray(raw).reshape(-1)), deq


def q8_activations(x: np.ndarray) -> np.ndarray:
    """The activations as the kernel sees them: blocks of 32 int8 with scale amax/127."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.round(blocks * inv)
    return (q * (amax / np.float32(127.0))).reshape(x.shape).astype(np.float64)


@pytest.mark.parametrize("wtype", sorted(TYPES))
@pytest.mark.parametrize("n,k", [(16, 32), (192, 576), (100, 1536), (576, 64)])
@pytest.mark.parametrize("m", [1, 3, 5, 6, 8, 9, 10, 12, 13, 16, 17, 33, 64])
def test_gemm_matches_dequantize_then_matmul(wtype: int, n: int, k: int, m: int) -> None:
    w, deq = quantized_weight(wtype, n, k, seed=n * k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    ref = x.numpy().astype(np.float64) @ deq.astype(np.float64).T
    scale = np.abs(ref).max() + 1e-6
    # fp32 activations: the dequantized product, to fp32 rounding.
    assert np.abs(ops.gemm(x, w, wtype, n, k).numpy() - ref).max() / scale < 2e-6
    y = ops.gemm(x, w, wtype, n, k, int8_activations=True)
    # Exact up to fp32 summation: the reference quantizes the activations the same way.
    ref_q8 = q8_activations(x.numpy()) @ deq.astype(np.float64).T
    assert np.abs(y.numpy() - ref_q8).max() / scale < 2e-5
    # And close to the plain fp32 matmul: the int8 activations cost well under 1%.
    rel = np.linalg.norm(y.numpy() - ref) / np.linalg.norm(ref)
    assert rel < 0.01


def test_gemm_writes_into_strided_rows_and_keeps_results_across_thread_counts() -> None:
    w, _ = quantized_weight(ops.Q4_1, 64, 128, seed=1)
    x_full = torch.randn(5, 256)
    x = x_full[:, :128]  # a row stride of 256
    out = torch.zeros(5, 100)[:, :64]
    for int8 in (False, True):
        ops.gemm(x, w, ops.Q4_1, 64, 128, out=out, int8_activations=int8)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = ops.gemm(x.contiguous(), w, ops.Q4_1, 64, 128, int8_activations=int8)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(out, single)


@pytest.mark.parametrize("wtype", sorted(TYPES))
def test_dequantize_matches_gguf(wtype: int) -> None:
    w, deq = quantized_weight(wtype, 70, 96, seed=3)
    assert np.array_equal(ops.dequantize(w, wtype, 70, 96).numpy(), deq)
    rows = torch.tensor([5, 0, 69, 5])
    assert np.array_equal(ops.dequantize(w, wtype, 70, 96, rows=rows).numpy(), deq[[5, 0, 69, 5]])
    with pytest.raises(IndexError):
        ops.dequantize(w, wtype, 70, 96, rows=torch.tensor([70]))


def test_bad_inputs_name_the_problem() -> None:
    w, _ = quantized_weight(ops.Q8_0, 8, 64, seed=0)
    with pytest.raises(ValueError, match="unsupported weight type"):
        ops.dequantize(w, 12, 8, 64)
    with pytest.raises(ValueError, match="bytes"):
        ops.dequantize(w[:-1], ops.Q8_0, 8, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        ops.gemm(torch.randn(1, 48), w, ops.Q8_0, 8, 48)


@pytest.fixture(scope="module")
def scalar_library():
    """The kernels built for plain x86-64 (no AVX2, no F16C): the scalar fallback."""
    from kernels_cpu.build import library_path

    return ops.load_library(library_path(march="x86-64"))


@pytest.mark.parametrize("wtype", sorted(TYPES))
def test_scalar_fallback_matches_the_same_references(scalar_library, monkeypatch, wtype):
    monkeypatch.setattr(ops, "_lib", scalar_library)
    assert ops.simd_level() == "scalar"
    n, k, m = 40, 96, 6
    w, deq = quantized_weight(wtype, n, k, seed=11)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5))
    ref = x.numpy().astype(np.float64) @ deq.astype(np.float64).T
    scale = np.abs(ref).max()
    assert np.abs(ops.gemm(x, w, wtype, n, k).numpy() - ref).max() / scale < 2e-6
    ref_q8 = q8_activations(x.numpy()) @ deq.astype(np.float64).T
    y8 = ops.gemm(x, w, wtype, n, k, int8_activations=True).numpy()
    assert np.abs(y8 - ref_q8).max() / scale < 2e-5
    assert np.array_equal(ops.dequantize(w, wtype, n, k).numpy(), deq)


@pytest.mark.parametrize("wtype", sorted(TYPES))
def test_dequantize_to_bf16_rounds_as_torch_does(wtype: int) -> None:
    w, deq = quantized_weight(wtype, 70, 96, seed=4)
    expected = torch.from_numpy(deq).bfloat16()
    assert torch.equal(ops.dequantize(w, wtype, 70, 96, dtype=torch.bfloat16), expected)
    rows = torch.tensor([69, 3])
    got = ops.dequantize(w, wtype, 70, 96, rows=rows, dtype=torch.bfloat16)
    assert torch.equal(got, expected[[69, 3]])
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        ops.dequantize(w, wtype, 70, 96, dtype=torch.float16)
    with pytest.raises(ValueError, match="contiguous torch.bfloat16"):
        ops.dequantize(w, wtype, 70, 96, out=torch.empty(70, 96), dtype=torch.bfloat16)


needs_bf16_gemm = pytest.mark.skipif(
    not ops.has_bf16_gemm(), reason="this CPU has no AVX512-BF16 (the oneDNN path is tested)"
)


@pytest.fixture(params=["amx", "vdpbf16ps"])
def bf16_kernel(request):
    """Each bf16 GEMM test on both kernels where this CPU has AMX; on vdpbf16ps only elsewhere."""
    had_amx = ops.bf16_amx()
    if request.param == "amx" and not had_amx:
        pytest.skip("this CPU (or its kernel) gives no AMX tiles: vdpbf16ps is tested")
    ops.bf16_amx(request.param == "amx")
    yield request.param
    ops.bf16_amx(had_amx)


@needs_bf16_gemm
@pytest.mark.parametrize("wtype", sorted(TYPES))
@pytest.mark.parametrize("n,k", [(64, 32), (100, 576), (576, 1536), (70, 96)])
@pytest.mark.parametrize("m", [1, 11, 12, 13, 17, 33, 64, 300])  # 300: AMX's many-rows path
def test_bf16_gemm_is_the_product_of_the_bf16_rounded_operands(bf16_kernel, wtype, n, k, m) -> None:
    w, deq = quantized_weight(wtype, n, k, seed=n + k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    xb = x.bfloat16().double().numpy()
    wb = torch.from_numpy(deq).bfloat16().double().numpy()
    ref = xb @ wb.T  # exact products; only the fp32 sums differ
    y = ops.gemm_bf16(x, w, wtype, n, k).numpy()
    assert np.abs(y - ref).max() / (np.abs(ref).max() + 1e-6) < 2e-6


@needs_bf16_gemm
def test_bf16_gemm_of_many_rows_over_a_weight_packed_in_parts(bf16_kernel) -> None:
    # AMX's many-rows path packs at most 8 MiB of bf16 weight at a time: 8,200 x 576 is two
    # parts, the second with a last panel of 8 columns.
    n, k, m = 8200, 576, 270
    w, deq = quantized_weight(ops.Q4_1, n, k, seed=5)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3))
    ref = x.bfloat16().double().numpy() @ torch.from_numpy(deq).bfloat16().double().numpy().T
    y = ops.gemm_bf16(x, w, ops.Q4_1, n, k).numpy()
    assert np.abs(y - ref).max() / np.abs(ref).max() < 2e-6


@needs_bf16_gemm
@pytest.mark.parametrize("m", [40, 290])
def test_bf16_gemm_writes_strided_rows_and_keeps_results_across_thread_counts(
    bf16_kernel, m
) -> None:
    w, _ = quantized_weight(ops.Q4_1, 100, 128, seed=2)
    x = torch.randn(m, 256)[:, :128]
    out = torch.zeros(m, 160)[:, :100]
    ops.gemm_bf16(x, w, ops.Q4_1, 100, 128, out=out)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.gemm_bf16(x.contiguous(), w, ops.Q4_1, 100, 128)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, single)
    with pytest.raises(ValueError, match="multiple of 32"):
        ops.gemm_bf16(torch.randn(3, 48), w, ops.Q4_1, 100, 48)


@needs_bf16_gemm
@pytest.mark.parametrize("n,k", [(64, 32), (100, 576), (70, 96), (1000, 64)])
def test_q8_panels_give_the_per_call_products_bit_for_bit(n, k) -> None:
    w, _ = quantized_weight(ops.Q8_0, n, k, seed=7 * n + k)
    panels = ops.pack_q8_panels(w, n, k)
    # the blocks' own bytes, the last panel's missing columns zero
    assert panels.dtype == torch.uint8 and panels.numel() == (n + 31) // 32 * 32 * (k // 32) * 34
    had_amx = ops.bf16_amx()
    ops.bf16_amx(False)  # Q8 panels always run on vdpbf16ps: the per-call path's twin
    threads = torch.get_num_threads()
    try:
        for m in (1, 9, 12, 13, 33, 64):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            per_call = ops.gemm_bf16(x, w, ops.Q8_0, n, k)
            assert torch.equal(ops.gemm_bf16_q8_panels(x, panels, n, k), per_call)
        # strided rows in and out, and one thread, give the same numbers
        x = torch.randn(40, 2 * k)[:, :k]
        out = torch.zeros(40, n + 5)[:, :n]
        ops.gemm_bf16_q8_panels(x, panels, n, k, out=out)
        torch.set_num_threads(1)
        assert torch.equal(out, ops.gemm_bf16_q8_panels(x.contiguous(), panels, n, k))
    finally:
        torch.set_num_threads(threads)
        ops.bf16_amx(had_amx)


@needs_bf16_gemm
def test_q8_panels_refuse_what_does_not_fit_them() -> None:
    w, _ = quantized_weight(ops.Q8_0, 100, 128, seed=4)
    panels = ops.pack_q8_panels(w, 100, 128)
    x = torch.randn(3, 128)
    with pytest.raises(ValueError, match="panels must be the 17408 contiguous uint8 bytes"):
        ops.gemm_bf16_q8_panels(x, panels[:-1], 100, 128)
    with pytest.raises(ValueError, match="panels must be"):
        ops.gemm_bf16_q8_panels(x, panels, 200, 128)  # another weight's shape
    with pytest.raises(ValueError, match="panels must be"):
        ops.gemm_bf16_q8_panels(x, panels.view(torch.int8), 100, 128)
    with pytest.raises(ValueError, match="x must be float32"):
        ops.gemm_bf16_q8_panels(torch.randn(3, 64), panels, 100, 128)
    with pytest.raises(ValueError, match="multiple of 32"):
        ops.gemm_bf16_q8_panels(x, panels, 100, 120)
    with pytest.raises(ValueError, match="bytes, expected 100x96"):
        ops.pack_q8_panels(w, 100, 96)
    q4, _ = quantized_weight(ops.Q4_1, 64, 64, seed=1)
    with pytest.raises(ValueError, match="expected 64x64 of type 8"):
        ops.pack_q8_panels(q4, 64, 64)


@pytest.mark.parametrize("wtype", sorted(TYPES))
def test_the_avx2_build_matches_the_same_references_on_any_avx2_cpu(monkeypatch, wtype):
    # On an AVX-512 CPU the native build takes the 16-lane paths: the 8-lane ones (the
    # register kernel to 12 rows: scaled sums of q * x below 3 rows, dequantized blocks with
    # two accumulators a row from 3 and one from 6; the 6 x 16 panels from 13) run here.
    from kernels_cpu.build import library_path

    with open("/proc/cpuinfo") as f:
        if " avx2" not in f.read():
            pytest.skip("this CPU has no AVX2")
    monkeypatch.setattr(ops, "_lib", ops.load_library(library_path(march="haswell")))
    assert ops.simd_level() == "avx2"
    n, k = 100, 576
    w, deq = quantized_weight(wtype, n, k, seed=12)
    for m in (1, 2, 3, 5, 6, 8, 12, 13, 33):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        ref = x.numpy().astype(np.float64) @ deq.astype(np.float64).T
        err = np.abs(ops.gemm(x, w, wtype, n, k).numpy() - ref).max() / np.abs(ref).max()
        assert err < 2e-6, (m, err)
