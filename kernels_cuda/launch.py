"""Launches the CUDA kernels for kernels_cuda.ops: grids, arguments, workspaces.

Functions here take inputs that ops has validated for both paths and add the CUDA kernels'
own requirements (fp16/bf16, 16-byte aligned dense rows). Modules are compiled per (file,
dtype, head_dim) at first use and kept per device. Tests replace `kernel`, `stream` and
`sm_count` to run these launches on a CPU emulator of the kernels.
"""

from __future__ import annotations

import ctypes
import math
import threading

import torch

from kernels_cuda import compiler

_DTYPE_DEFINES = {torch.float16: "-DRS_DTYPE_F16", torch.bfloat16: "-DRS_DTYPE_BF16"}
_LOG2E = math.log2(math.e)
# Mirrors decode_attention.cu / prefill_attention.cu / norm.cu.
_DECODE_WARPS = 4
_DECODE_THREADS = 128
_PREFILL_THREADS = 128
_PREFILL_BLOCK_M = 64
_PREFILL_BLOCK_N = 64
_NORM_MAX_VECS_PER_THREAD = 4
_MAX_GRID_YZ = 65535

_modules: dict[tuple, compiler.Module] = {}
_modules_lock = threading.Lock()


def require_vectorizable(name: str, t: torch.Tensor, inner_dims: int = 1) -> None:
    """The kernels read rows as 16-byte vectors: rows dense and 16-byte aligned."""
    dense = t.stride(-1) == 1 and (inner_dims < 2 or t.stride(-2) == t.shape[-1])
    if not dense or t.stride(0) % 8 or t.data_ptr() % 16 or t.shape[-1] % 8:
        raise ValueError(
            f"{name} {tuple(t.shape)} strides {t.stride()} must have dense rows, a last dim and "
            "row stride that are multiples of 8 and a 16-byte aligned start for the CUDA kernels"
        )


def require_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _DTYPE_DEFINES:
        raise ValueError(f"the CUDA kernels support float16 and bfloat16; {name} is {t.dtype}")


def kernel(
    filename: str, name: str, dtype: torch.dtype, device: torch.device, head_dim: int | None = None
) -> compiler.Kernel:
    """The kernel `name` of `filename`, compiled for dtype/head_dim and the device's arch."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (filename, dtype, head_dim, index)
    module = _modules.get(key)
    if module is None:
        with _modules_lock:
            module = _modules.get(key)
            if module is None:
                options = [_DTYPE_DEFINES[dtype]]
                if head_dim is not None:
                    options.append(f"-DRS_HEAD_DIM={head_dim}")
                arch = compiler.arch_name(torch.cuda.get_device_capability(index))
                source = compiler.load_source(filename)
                label = f"{filename.removesuffix('.cu')}_{str(dtype).removeprefix('torch.')}"
                cubin = compiler.compile_cubin(source, label, arch, options)
                module = _modules[key] = compiler.Module(cubin, index)
    return module.kernel(name)


def stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _i32(v: int) -> ctypes.c_int32:
    return ctypes.c_int32(v)


def _i64(v: int) -> ctypes.c_int64:
    return ctypes.c_int64(v)


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Launches reshape_and_cache (see ops.reshape_and_cache)."""
    require_dtype("key", key)
    for name, t in (("key", key), ("value", value)):
        require_vectorizable(name, t, inner_dims=2)
    if not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("k_cache and v_cache must be contiguous for the CUDA kernel")
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    row_vecs = num_kv_heads * head_dim // 8
    fn = kernel("cache.cu", "reshape_and_cache", k_cache.dtype, k_cache.device)
    args = [
        _ptr(key), _ptr(value), _ptr(k_cache), _ptr(v_cache), _ptr(slot_mapping),
        _i64(key.stride(0)), _i64(value.stride(0)), _i32(row_vecs), _i64(num_blocks * block_size),
    ]  # fmt: skip
    block = min(256, _round_up(row_vecs, 32))
    fn.launch((num_tokens, 1, 1), (block, 1, 1), args, 0, stream(k_cache.device))


def _decode_partition_size(work_items: int, max_context: int, num_sms: int) -> int:
    """Tokens per split: 512, halved (down to 128) while the grid would not fill the GPU."""
    size = 512
    while size > 128 and work_items * -(-max_context // size) < num_sms:
        size //= 2
    return size


def _check_attention_layout(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    """The memory layout both attention kernels read: vectorizable rows, contiguous caches."""
    require_dtype("query", query)
    require_vectorizable("query", query, inner_dims=2)
    require_vectorizable("out", out, inner_dims=2)
    if not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("k_cache and v_cache must be contiguous for the CUDA kernel")
    if block_tables.stride(1) != 1 or not context_lens.is_contiguous():
        raise ValueError("block_tables rows and context_lens must be contiguous")


def paged_attention_decode(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int | None,
) -> None:
    """Launches decode attention, split along the sequence (plus a reduce) when long."""
    _check_attention_layout(out, query, k_cache, v_cache, block_tables, context_lens)
    num_seqs, num_q_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if head_dim > 256:
        raise ValueError(f"the decode kernel supports head_dim <= 256, got {head_dim}")
    if num_seqs == 0:
        return
    group = num_q_heads // num_kv_heads
    g_tile = 1 if group == 1 else 2 if group == 2 else 4 if group <= 4 else 8
    chunks = -(-group // g_tile)
    if num_kv_heads * chunks > _MAX_GRID_YZ:
        raise ValueError(f"too many heads for the decode grid: {num_kv_heads * chunks}")
    max_context = block_tables.shape[1] * block_size
    if max_context_len is not None:
        max_context = min(max_context, max_context_len)
    device = query.device
    part_size = _decode_partition_size(
        num_seqs * num_kv_heads * chunks, max(max_context, 1), sm_count(device)
    )
    num_parts = max(1, -(-max_context // part_size))
    if num_parts > _MAX_GRID_YZ:
        raise ValueError(f"context of {max_context} tokens needs {num_parts} splits, over 65535")
    split = num_parts > 1
    part_out = part_max = part_sum = None
    if split:
        part_out = torch.empty(
            num_seqs, num_q_heads, num_parts, head_dim, dtype=torch.float32, device=device
        )
        part_max = torch.empty(num_seqs, num_q_heads, num_parts, dtype=torch.float32, device=device)
        part_sum = torch.empty_like(part_max)
    smem = max(g_tile * part_size, _DECODE_WARPS * g_tile * head_dim) * 4
    cu_stream = stream(device)
    fn = kernel(
        "decode_attention.cu", f"paged_attention_decode_g{g_tile}", query.dtype, device, head_dim
    )
    args = [
        _ptr(out), _ptr(part_out), _ptr(part_max), _ptr(part_sum), _ptr(query), _ptr(k_cache),
        _ptr(v_cache), _ptr(block_tables), _ptr(context_lens), ctypes.c_float(scale * _LOG2E),
        _i32(num_q_heads), _i32(num_kv_heads), _i64(query.stride(0)), _i64(out.stride(0)),
        _i32(block_tables.stride(0)), _i32(block_size), _i32(part_size), _i32(num_parts),
    ]  # fmt: skip
    grid = (num_seqs, num_kv_heads * chunks, num_parts)
    fn.launch(grid, (_DECODE_THREADS, 1, 1), args, smem, cu_stream)
    if split:
        reduce = kernel(
            "decode_attention.cu", "paged_attention_decode_reduce", query.dtype, device, head_dim
        )
        args = [
            _ptr(out), _ptr(part_out), _ptr(part_max), _ptr(part_sum), _ptr(context_lens),
            _i32(num_q_heads), _i64(out.stride(0)), _i32(part_size), _i32(num_parts),
        ]  # fmt: skip
        grid = (num_seqs, num_q_heads, 1)
        reduce.launch(grid, (_DECODE_THREADS, 1, 1), args, num_parts * 4, cu_stream)


def prefill_smem_bytes(head_dim: int) -> int:
    """Dynamic shared memory of the prefill kernel: Q, K and V tiles of padded rows."""
    return (_PREFILL_BLOCK_M + 2 * _PREFILL_BLOCK_N) * (head_dim + 8) * 2


def paged_attention_prefill(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_q_len: int,
) -> None:
    """Launches prefill attention: grid (row tiles, KV heads, sequences)."""
    _check_attention_layout(out, query, k_cache, v_cache, block_tables, context_lens)
    if not cu_seqlens_q.is_contiguous():
        raise ValueError("cu_seqlens_q must be contiguous")
    _, num_q_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = cu_seqlens_q.shape[0] - 1
    if head_dim > 256 or head_dim % 16:
        raise ValueError(
            f"the prefill kernel supports head_dim a multiple of 16 up to 256, got {head_dim}"
        )
    if num_seqs > _MAX_GRID_YZ or num_kv_heads > _MAX_GRID_YZ:
        raise ValueError(
            f"the prefill grid allows 65535 sequences and KV heads; got "
            f"{num_seqs} and {num_kv_heads}"
        )
    if num_seqs == 0 or max_q_len == 0:
        return
    group = num_q_heads // num_kv_heads
    smem = prefill_smem_bytes(head_dim)
    fn = kernel(
        "prefill_attention.cu", "paged_attention_prefill", query.dtype, query.device, head_dim
    )
    args = [
        _ptr(out), _ptr(query), _ptr(k_cache), _ptr(v_cache), _ptr(block_tables),
        _ptr(cu_seqlens_q), _ptr(context_lens), ctypes.c_float(scale * _LOG2E),
        _i32(num_q_heads), _i32(num_kv_heads), _i64(query.stride(0)), _i64(out.stride(0)),
        _i32(block_tables.stride(0)), _i32(block_size),
    ]  # fmt: skip
    grid = (-(-max_q_len * group // _PREFILL_BLOCK_M), num_kv_heads, num_seqs)
    fn.launch(grid, (_PREFILL_THREADS, 1, 1), args, smem, stream(query.device))


def rms_norm(
    out: torch.Tensor,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
) -> None:
    """Launches RMSNorm, fused with the residual add when `residual` is given."""
    require_dtype("x", x)
    for name, t in (("x", x), ("out", out), ("residual", residual), ("weight", weight)):
        if t is not None:
            require_vectorizable(name, t if t.dim() == 2 else t.view(1, -1))
    num_tokens, hidden = x.shape
    row_vecs = hidden // 8
    block = min(1024, _round_up(row_vecs, 32))
    if row_vecs > block * _NORM_MAX_VECS_PER_THREAD:
        raise ValueError(f"hidden size {hidden} is over the kernel's 32768")
    if num_tokens == 0:
        return
    fn = kernel("norm.cu", "rms_norm", x.dtype, x.device)
    args = [
        _ptr(out), _ptr(x), _ptr(residual), _ptr(weight), _i32(hidden), _i64(out.stride(0)),
        _i64(x.stride(0)), _i64(residual.stride(0) if residual is not None else 0),
        ctypes.c_float(eps),
    ]  # fmt: skip
    fn.launch((num_tokens, 1, 1), (block, 1, 1), args, 0, stream(x.device))


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    head_dim: int,
) -> None:
    """Launches the neox rotary embedding, in place on query and key."""
    require_dtype("query", query)
    if key is not None and key.dtype != query.dtype:
        raise ValueError(f"key dtype {key.dtype} differs from query's {query.dtype}")
    for name, t in (("query", query), ("key", key)):
        if t is not None and (t.stride(-1) != 1 or (t.dim() == 3 and t.stride(1) != head_dim)):
            raise ValueError(f"{name} strides {t.stride()} must give dense heads of {head_dim}")
    if cos.stride(1) != 1 or sin.stride(1) != 1 or not positions.is_contiguous():
        raise ValueError("cos/sin rows and positions must be contiguous")
    num_tokens = positions.shape[0]
    if num_tokens == 0:
        return
    num_q_heads = query[0].numel() // head_dim
    num_kv_heads = key[0].numel() // head_dim if key is not None else 0
    fn = kernel("rotary.cu", "rotary_embedding_neox", query.dtype, query.device)
    args = [
        _ptr(positions), _ptr(query), _ptr(key), _ptr(cos), _ptr(sin), _i64(cos.stride(0)),
        _i64(sin.stride(0)), _i64(cos.shape[0]), _i32(num_q_heads), _i32(num_kv_heads),
        _i32(head_dim), _i32(cos.shape[1]), _i64(query.stride(0)),
        _i64(key.stride(0) if key is not None else 0),
    ]  # fmt: skip
    pairs = (num_q_heads + num_kv_heads) * cos.shape[1]
    block = min(256, _round_up(pairs, 32))
    fn.launch((num_tokens, 1, 1), (block, 1, 1), args, 0, stream(query.device))


def silu_and_mul(out: torch.Tensor, x: torch.Tensor) -> None:
    """Launches SiLU-and-mul."""
    require_dtype("x", x)
    require_vectorizable("x", x)
    require_vectorizable("out", out)
    num_tokens, inter = out.shape
    if num_tokens == 0 or inter == 0:
        return
    fn = kernel("activation.cu", "silu_and_mul", x.dtype, x.device)
    args = [_ptr(out), _ptr(x), _i32(inter), _i64(out.stride(0)), _i64(x.stride(0))]
    block = 256
    grid = (num_tokens, -(-(inter // 8) // block), 1)
    fn.launch(grid, (block, 1, 1), args, 0, stream(x.device))
