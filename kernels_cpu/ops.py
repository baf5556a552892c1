"""Python face of the CPU kernels: quantized GEMM and row dequantization over ctypes.

ctypes over data pointers rather than a torch extension: the library builds in ~3 s against
no torch headers (a torch extension takes ~1 min on this 2-core machine) and a call costs a
few microseconds (measured in tools/bench_quant.py), against ~210 linears a decode step.
The library links libgomp.so.1, which resolves to the copy torch already loaded: one
OpenMP runtime, one thread pool. Tensors must be CPU, contiguous, float32 (activations)
and uint8 (the GGUF blocks, rows of k/32 blocks).
"""

from __future__ import annotations

import ctypes
import logging

import torch

from kernels_cpu.build import BuildError, library_path

logger = logging.getLogger(__name__)

# ggml type ids the kernels take, with their (block elements, block bytes)
Q4_0, Q4_1, Q8_0 = 2, 3, 8
# Ours, not a ggml type: fp16 d, uint16 zero point z (0..16), 16 bytes of nibbles laid out as
# Q4_0/Q4_1's; value (q - z) * d, exact in fp32: AWQ/GPTQ groups map onto it (hf_quant.py).
Q4_Z = 100
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34, Q4_Z: 20}
QK = 32

_lib: ctypes.CDLL | None = None
_load_error: str | None = None
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def load_library(path: str) -> ctypes.CDLL:
    """Open a built kernels_cpu library and declare its functions' argument types."""
    lib = ctypes.CDLL(path)
    args = [ctypes.c_int, _ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _i64, ctypes.c_int]
    lib.rs_gemm.argtypes = lib.rs_gemm_f32.argtypes = lib.rs_gemm_bf16.argtypes = args
    lib.rs_has_bf16_gemm.restype = ctypes.c_int
    lib.rs_q8_panels_bytes.argtypes, lib.rs_q8_panels_bytes.restype = [_i64, _i64], _i64
    lib.rs_pack_q8_panels.argtypes = [_ptr, _i64, _i64, _ptr, ctypes.c_int]
    lib.rs_gemm_bf16_q8_panels.argtypes = [_ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _i64]
    lib.rs_gemm_bf16_q8_panels.argtypes += [ctypes.c_int]
    lib.rs_bf16_amx.argtypes, lib.rs_bf16_amx.restype = [ctypes.c_int], ctypes.c_int
    lib.rs_dequant_rows.argtypes = [ctypes.c_int, _ptr, _i64, _ptr, _i64, _ptr, ctypes.c_int]
    lib.rs_dequant_rows_bf16.argtypes = lib.rs_dequant_rows.argtypes
    lib.rs_simd_level.restype = ctypes.c_int
    lib.rs_add_rms_norm.argtypes = [_ptr] * 5 + [_i64, _i64, ctypes.c_float, ctypes.c_int]
    lib.rs_rope.argtypes = [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, ctypes.c_int]
    lib.rs_silu_and_mul.argtypes = [_ptr, _ptr, _i64, _i64, ctypes.c_int]
    for fn in (lib.rs_add_rms_norm, lib.rs_rope, lib.rs_silu_and_mul):
        fn.restype = None
    lib.rs_paged_decode_attention.argtypes = (
        [_ptr] * 5 + [_i64] * 6 + [ctypes.c_float, _ptr, ctypes.c_int]
    )
    lib.rs_paged_decode_attention_bf16.argtypes = lib.rs_paged_decode_attention.argtypes
    lib.rs_paged_prefill_attention.argtypes = (
        [_ptr, _i64] + [_ptr] * 3 + [_i64] * 6 + [ctypes.c_float, _ptr, ctypes.c_int]
    )
    lib.rs_paged_prefill_attention_bf16.argtypes = lib.rs_paged_prefill_attention.argtypes
    lib.rs_has_prefill_attention.restype = ctypes.c_int
    lib.rs_prefill_attention_bf16_products.argtypes = [_i64] * 3
    lib.rs_prefill_attention_bf16_products.restype = ctypes.c_int
    lib.rs_decode_attention_bf16_products.argtypes = [_i64] * 3
    lib.rs_decode_attention_bf16_products.restype = ctypes.c_int
    lib.rs_bf16_dot_scores.argtypes, lib.rs_bf16_dot_scores.restype = [ctypes.c_int], ctypes.c_int
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib, _load_error
    if _lib is not None or _load_error is not None:
        return _lib
    try:
        _lib = load_library(library_path())
    except (BuildError, OSError) as e:
        _load_error = str(e)
        logger.warning("kernels_cpu unavailable, quantized weights will be dequantized: %s", e)
    return _lib


def available() -> bool:
    """Whether the kernels are built and loaded (compiling them on first call if needed)."""
    return _load() is not None


def simd_level() -> str:
    """Which dot-product path the library was compiled with: scalar, avx2 or avx512vnni."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"kernels_cpu is not available: {_load_error}")
    return ("scalar", "avx2", "avx512vnni")[lib.rs_simd_level()]


def _check(w: torch.Tensor, wtype: int, n: int, k: int) -> None:
    if wtype not in BLOCK_BYTES:
        raise ValueError(f"unsupported weight type {wtype} (kernels take {sorted(BLOCK_BYTES)}).")
    if k % QK:
        raise ValueError(f"in_features must be a multiple of {QK}, got {k}.")
    if w.dtype != torch.uint8 or not w.is_contiguous() or w.device.type != "cpu":
        raise ValueError("quantized weight must be a contiguous uint8 CPU tensor.")
    if w.numel() != n * (k // QK) * BLOCK_BYTES[wtype]:
        raise ValueError(
            f"quantized weight has {w.numel()} bytes, expected {n}x{k} of type {wtype}."
        )


def gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    wtype: int,
    n: int,
    k: int,
    out: torch.Tensor | None = None,
    int8_activations: bool = False,
) -> torch.Tensor:
    """x [M, k] float32 @ W.T where W [n, k] is `w`'s blocks of `wtype`: [M, n] float32.

    int8_activations: quantize x to int8 blocks first (llama.cpp's way: int8 dot products,
    ~1% error); otherwise x stays fp32 and the result is the dequantized product to fp32
    rounding.
    """
    lib = _load()
    if lib is None:
        raise RuntimeError(f"kernels_cpu is not available: {_load_error}")
    assert x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == k and x.stride(1) == 1
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32)
    fn = lib.rs_gemm if int8_activations else lib.rs_gemm_f32
    rc = fn(
        wtype,
        w.data_ptr(),
        n,
        k,
        x.data_ptr(),
        m,
        x.stride(0),
        out.data_ptr(),
        out.stride(0),
        torch.get_num_threads(),
    )
    if rc:
        _check(w, wtype, n, k)
        raise RuntimeError(f"gemm failed ({rc}) for type {wtype}, n={n}, k={k}.")
    return out


def has_bf16_gemm() -> bool:
    """Whether gemm_bf16 runs here: the kernels are built for a CPU with AVX512-BF16."""
    lib = _load()
    return lib is not None and bool(lib.rs_has_bf16_gemm())


def bf16_amx(enable: bool | None = None) -> bool:
    """Whether gemm_bf16 runs on AMX tiles (a CPU with AMX-BF16 whose kernel grants the tile
    state), else on vdpbf16ps. enable switches the AMX path off or back on (for tests and
    comparisons); the result is the state afterwards."""
    lib = _load()
    if lib is None:
        return False
    return bool(lib.rs_bf16_amx(-1 if enable is None else int(enable)))


def gemm_bf16(
    x: torch.Tensor, w: torch.Tensor, wtype: int, n: int, k: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, k] float32 @ W.T in bf16: x and the dequantized W rounded to bf16 (nearest even),
    products summed in fp32 (AMX tiles where bf16_amx(), else vdpbf16ps); [M, n] float32.
    Needs has_bf16_gemm()."""
    lib = _lib_or_raise()
    assert x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == k and x.stride(1) == 1
    out, rc = _bf16_product(lib.rs_gemm_bf16, (wtype, w.data_ptr(), n, k), x, n, out)
    if rc == 3:
        raise RuntimeError("gemm_bf16 needs a CPU with AVX512-BF16 (see has_bf16_gemm()).")
    if rc:
        _check(w, wtype, n, k)
        raise RuntimeError(f"gemm_bf16 failed ({rc}) for type {wtype}, n={n}, k={k}.")
    return out


def _bf16_product(
    fn, weight_args: tuple, x: torch.Tensor, n: int, out: torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    """Calls a bf16 GEMM entry point: fn(*weight_args, x, rows, x's row stride, out, out's row
    stride, threads), `out` [rows, n] fp32 made if None. Returns (out, its return code)."""
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32)
    rc = fn(
        *weight_args,
        x.data_ptr(),
        m,
        x.stride(0),
        out.data_ptr(),
        out.stride(0),
        torch.get_num_threads(),
    )
    return out, int(rc)


def pack_q8_panels(w: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """A Q8_0 weight's blocks (`w`, [n, k]) regrouped into gemm_bf16's panel order, for
    gemm_bf16_q8_panels: uint8, the blocks' own bytes (n rounded up to 32). Needs
    has_bf16_gemm()."""
    lib = _lib_or_raise()
    _check(w, Q8_0, n, k)
    panels = torch.empty(int(lib.rs_q8_panels_bytes(n, k)), dtype=torch.uint8)
    rc = lib.rs_pack_q8_panels(w.data_ptr(), n, k, panels.data_ptr(), torch.get_num_threads())
    if rc == 3:
        raise RuntimeError("Q8 panels need a CPU with AVX512-BF16 (see has_bf16_gemm()).")
    if rc:
        raise RuntimeError(f"pack_q8_panels failed ({rc}) for n={n}, k={k}.")
    return panels


def gemm_bf16_q8_panels(
    x: torch.Tensor, panels: torch.Tensor, n: int, k: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """gemm_bf16's product over a Q8_0 weight's pack_q8_panels: x [M, k] float32 @ W.T,
    [M, n] float32, equal bit for bit to gemm_bf16 on vdpbf16ps (never AMX tiles)."""
    lib = _lib_or_raise()
    if k % QK:
        raise ValueError(f"in_features must be a multiple of {QK}, got {k}.")
    size = int(lib.rs_q8_panels_bytes(n, k))
    if panels.dtype != torch.uint8 or not panels.is_contiguous() or panels.numel() != size:
        raise ValueError(
            f"panels must be the {size} contiguous uint8 bytes of an {n}x{k} weight's "
            f"pack_q8_panels, got {panels.numel()} {panels.dtype}."
        )
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(
            f"x must be float32 [M, {k}] with unit column stride, got {tuple(x.shape)}."
        )
    out, rc = _bf16_product(lib.rs_gemm_bf16_q8_panels, (panels.data_ptr(), n, k), x, n, out)
    if rc == 3:
        raise RuntimeError(
            "gemm_bf16_q8_panels needs a CPU with AVX512-BF16 (see has_bf16_gemm())."
        )
    if rc:
        raise RuntimeError(f"gemm_bf16_q8_panels failed ({rc}) for n={n}, k={k}.")
    return out


def dequantize(
    w: torch.Tensor,
    wtype: int,
    n: int,
    k: int,
    rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Values of W [n, k] (or of its rows `rows`, int64) from `w`'s blocks, in `dtype`:
    float32, or bfloat16 (the float32 values rounded to nearest even, as `.bfloat16()`)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"kernels_cpu is not available: {_load_error}")
    _check(w, wtype, n, k)
    count = n if rows is None else rows.numel()
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
        if count and (int(rows.min()) < 0 or int(rows.max()) >= n):
            raise IndexError(f"row index out of range for a weight of {n} rows.")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dequantize gives float32 or bfloat16, not {dtype}.")
    if out is None:
        out = torch.empty(count, k, dtype=dtype)
    elif out.dtype != dtype or not out.is_contiguous() or out.numel() != count * k:
        raise ValueError(f"out must be a contiguous {dtype} tensor of {count}x{k}.")
    fn = lib.rs_dequant_rows if dtype == torch.float32 else lib.rs_dequant_rows_bf16
    rc = fn(
        wtype,
        w.data_ptr(),
        k,
        None if rows is None else rows.data_ptr(),
        count,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if rc:
        raise RuntimeError(f"rs_dequant_rows failed ({rc}) for type {wtype}.")
    return out


def _attention_out(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """An attention kernel's output: `out` checked (contiguous fp32 of q's shape), or new."""
    if out is None:
        return torch.empty(q.shape, dtype=torch.float32)
    if out.shape != q.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous float32 {tuple(q.shape)}.")
    return out


def bf16_attention_supported(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether paged_decode_attention reads bf16 pools for this shape (its vector path)."""
    return (
        available()
        and simd_level() != "scalar"
        and kv_heads > 0
        and heads % kv_heads == 0
        and heads // kv_heads <= 8
        and head_dim % 8 == 0
    )


def decode_attention_bf16_products(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether paged_decode_attention scores a bf16 pool's keys in bf16 for this shape here
    (the queries rounded to bf16, products summed in fp32; the softmax and the values stay
    fp32), rather than in fp32 over the widened keys: on AMX tiles (up to 16 query heads, 6 a
    KV head, head_dim % 32 == 0 and kv_heads * head_dim <= 192: the default model's 9 over 3
    of 64), or, on a CPU with AVX512-BF16 and no AMX, by vdpbf16ps (up to 6 query heads a KV
    head, head_dim % 32 == 0; see bf16_dot_scores)."""
    lib = _load()
    return lib is not None and bool(
        lib.rs_decode_attention_bf16_products(heads, kv_heads, head_dim)
    )


def bf16_dot_scores(enable: bool | None = None) -> bool:
    """Whether paged_decode_attention scores bf16 pools by vdpbf16ps where AMX tiles do not
    (a CPU with AVX512-BF16 and no AMX, or the tiles switched off by bf16_amx). enable
    switches it off or back on (for tests and comparisons); the result is the state after."""
    lib = _load()
    if lib is None:
        return False
    return bool(lib.rs_bf16_dot_scores(-1 if enable is None else int(enable)))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q [rows, heads, head_dim] (one token a row) over the paged cache in place.

    k_cache/v_cache [num_blocks, block_size, kv_heads, head_dim] fp32, or bf16 where
    bf16_attention_supported (read widened to fp32; the scores in bf16 where
    decode_attention_bf16_products); block_ids [rows * width]
    int64 (each row's block table padded to width); bias [rows, width * block_size] additive
    (0 or -inf). Returns [rows, heads, head_dim] fp32 (in `out`, contiguous, if given).
    """
    lib = _load()
    if lib is None:
        raise RuntimeError(f"kernels_cpu is not available: {_load_error}")
    rows, heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    width = block_ids.numel() // max(rows, 1)
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache is {k_cache.dtype} but v_cache {v_cache.dtype}.")
    kv_dtype = k_cache.dtype if k_cache.dtype == torch.bfloat16 else torch.float32
    for name, t, dtype in (
        ("q", q, torch.float32),
        ("k_cache", k_cache, kv_dtype),
        ("v_cache", v_cache, kv_dtype),
        ("block_ids", block_ids, torch.int64),
        ("bias", bias, torch.float32),
    ):
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous {dtype}, got {t.dtype}.")
    if bias.numel() != rows * width * block_size:
        raise ValueError(f"bias has {bias.numel()} elements, expected {rows * width * block_size}.")
    out = _attention_out(q, out)
    fn = (
        lib.rs_paged_decode_attention_bf16
        if kv_dtype == torch.bfloat16
        else (lib.rs_paged_decode_attention)
    )
    rc = fn(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_ids.data_ptr(),
        bias.data_ptr(),
        rows,
        width,
        heads,
        kv_heads,
        head_dim,
        block_size,
        scale,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if rc == 2:
        raise ValueError(
            f"a bf16 cache takes head_dim % 8 == 0 and at most 8 query heads a KV head on a "
            f"vector build, got {heads} heads over {kv_heads}, head_dim {head_dim}."
        )
    if rc:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads.")
    return out


def prefill_attention_supported(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether paged_prefill_attention takes this shape here (an AVX-512 build)."""
    lib = _load()
    return (
        lib is not None
        and bool(lib.rs_has_prefill_attention())
        and kv_heads > 0
        and heads % kv_heads == 0
        and heads // kv_heads <= 8
        and head_dim % 16 == 0
    )


def prefill_attention_bf16_products(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether paged_prefill_attention multiplies a bf16 pool's products in bf16 for this
    shape here (AMX tiles, or vdpbf16ps on an AVX512-BF16 CPU without AMX), rather than in
    fp32 over the widened pool."""
    lib = _load()
    return lib is not None and bool(
        lib.rs_prefill_attention_bf16_products(heads, kv_heads, head_dim)
    )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,
    num_computed: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of one row's queries q [query_len, heads, head_dim] (positions
    num_computed ..) over its keys in the paged cache, read in place (the row's own keys
    already written): query i sees keys 0 .. num_computed + i.

    q fp32 with each token's heads contiguous (any stride between tokens: a view of the QKV
    projection's output is read where it is); k_cache/v_cache [num_blocks, block_size,
    kv_heads, head_dim] fp32 or bf16; block_ids int64: the row's block table, enough blocks
    for num_computed + query_len tokens. Needs prefill_attention_supported. Returns
    [query_len, heads, head_dim] fp32 (in `out`, contiguous, if given).
    """
    lib = _lib_or_raise()
    query_len, heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"k_cache and v_cache must both be fp32 or bf16, got {k_cache.dtype}.")
    if q.dtype != torch.float32 or q.stride(2) != 1 or q.stride(1) != head_dim:
        raise ValueError(
            f"q must be float32 with each token's heads contiguous, got {q.dtype} with "
            f"strides {q.stride()}."
        )
    for name, t, dtype in (
        ("k_cache", k_cache, k_cache.dtype),
        ("v_cache", v_cache, k_cache.dtype),
        ("block_ids", block_ids, torch.int64),
    ):
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous {dtype}, got {t.dtype}.")
    if block_ids.numel() * block_size < num_computed + query_len:
        raise ValueError(
            f"{block_ids.numel()} blocks of {block_size} do not hold "
            f"{num_computed + query_len} tokens."
        )
    out = _attention_out(q, out)
    ldq = q.stride(0) if query_len > 1 else heads * head_dim
    fn = (
        lib.rs_paged_prefill_attention_bf16
        if k_cache.dtype == torch.bfloat16
        else lib.rs_paged_prefill_attention
    )
    rc = fn(
        q.data_ptr(),
        ldq,
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_ids.data_ptr(),
        num_computed,
        query_len,
        heads,
        kv_heads,
        head_dim,
        block_size,
        scale,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if rc == 2:
        raise ValueError(
            f"the prefill kernel takes head_dim % 16 == 0 and at most 8 query heads a KV head "
            f"on an AVX-512 build, got {heads} heads over {kv_heads}, head_dim {head_dim}."
        )
    if rc:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads.")
    return out


# ------------------------------------------------------------------ the step's small fused ops
#
# fp32 CPU tensors only; callers (models/ops.py) check and fall back to torch otherwise.


def _lib_or_raise() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"kernels_cpu is not available: {_load_error}")
    return lib


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) for x [T, h] (residual None: x alone)."""
    lib = _lib_or_raise()
    rows, h = x.shape
    for t in (x, residual, weight):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
            raise ValueError("add_rms_norm takes contiguous float32 tensors.")
    if weight.numel() != h or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"add_rms_norm: shapes {tuple(x.shape)}, weight {tuple(weight.shape)}.")
    out, new_residual = torch.empty_like(x), torch.empty_like(x)
    lib.rs_add_rms_norm(
        x.data_ptr(),
        None if residual is None else residual.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        new_residual.data_ptr(),
        rows,
        h,
        eps,
        torch.get_num_threads(),
    )
    return out, new_residual


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [T, heads, head_dim] in place; cos, sin [T, 1 or absent, hd/2]."""
    lib = _lib_or_raise()
    tokens, heads, head_dim = x.shape
    if x.dtype != torch.float32 or x.stride(2) != 1 or x.stride(1) != head_dim:
        raise ValueError("rope_ takes float32 x whose heads are contiguous rows of head_dim.")
    for t in (cos, sin):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != tokens * head_dim // 2:
            raise ValueError(
                f"rope_: cos/sin must be contiguous float32 [{tokens}, {head_dim // 2}]."
            )
    lib.rs_rope(
        x.data_ptr(),
        tokens,
        heads,
        head_dim,
        x.stride(0),
        cos.data_ptr(),
        sin.data_ptr(),
        torch.get_num_threads(),
    )
    return x


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU of a fused [gate | up] x [T, 2n]: silu(gate) * up, [T, n]."""
    lib = _lib_or_raise()
    tokens, width = x.shape
    if x.dtype != torch.float32 or not x.is_contiguous() or width % 2:
        raise ValueError("silu_and_mul takes a contiguous float32 [T, 2n] tensor.")
    out = torch.empty(tokens, width // 2, dtype=torch.float32)
    lib.rs_silu_and_mul(x.data_ptr(), out.data_ptr(), tokens, width // 2, torch.get_num_threads())
    return out
