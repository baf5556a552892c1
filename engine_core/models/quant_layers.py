"""Weight-only quantized layers: GGUF blocks (Q4_0, Q4_1, Q8_0) kept as they are in memory.

A step runs kernels_cpu's GEMM on the blocks with fp32 activations: for a few rows (decode,
a verify row) the blocks are widened in registers; for more, each thread dequantizes a
cache-sized panel of weight rows once and runs a register-tiled micro-kernel over all the
step's rows. Both give the fp32 product of the dequantized weights without a resident fp32
copy (the model stays at the file's ~5 bits a weight). The scalar build (no AVX2) hands
steps of more than GEMM_MAX_ROWS rows to oneDNN's fp32 matmul over the weight dequantized
tile by tile into one shared scratch buffer.

Where the paths cross over (tools/bench_quant.py, 2 threads). On an AVX2-only CPU, from 10
rows the panel kernel (outer products of 6 rows x 16 columns) runs at 125-157 GF/s against
dequantize + oneDNN's 96-144 (3072 x 576, 576 x 1536, 960 x 576 and 576 x 576 at 128 to
2048 rows). On an AVX-512 CPU, from 9 rows its 12 x 32 panel kernel: 3072 x 576 at 16 rows
0.21 vs 0.28 ms, 32 rows 0.33 vs 0.42, 128 rows 1.06 vs 1.18, 2048 rows 17.3 vs 16.8 (even);
576 x 1536 at 32 rows 0.16 vs 0.24.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine_core.models.layers import onednn_linear_available
from kernels_cpu import ops
from kernels_cpu.build import cpuinfo_line

# fp32 matmul of the dequantized tiles: oneDNN's where torch has it (on AVX-512 CPUs twice
# torch's default sgemm here: 2048 x 576 x 1536 on one thread 16.1 vs 37.0 ms).
_ONEDNN = onednn_linear_available()
# Rows up to which the block GEMM beats dequantize + matmul (the module's docstring).
_CAPABILITY = torch.backends.cpu.get_cpu_capability()
GEMM_MAX_ROWS = 1 << 30 if _CAPABILITY in ("AVX2", "AVX512") else 256  # 256: the scalar build
# With matmul_dtype bfloat16, steps of this many rows or more multiply in bf16 (fewer stay
# fp32, where the register kernel is as fast: 3072 x 576 at 5 rows 0.11 ms either way).
BF16_MIN_ROWS = 13
# The same where the bf16 GEMM runs on AMX tiles, whose dequantizing pack costs what a few
# rows' fp32 FMAs do (a 2-core Emerald Rapids VM, tools/profile_step.py --dtype bfloat16, the
# one-call decode step at context 300, fp32 below 13 rows against bf16 from 2: 4 rows 13.0
# / 13.1 ms, 6 rows 14.7 / 13.9, 8 rows 18.9 / 17.5, 12 rows 31.2 / 20.7).
AMX_BF16_MIN_ROWS = 6
# The same on AMD's cores (Zen 4 on), which run vdpbf16ps at the rate of their FMAs where
# Intel's run it on one port (a 2-core Zen 4 VM, the same measure, fp32 / bf16: 7 rows 17.8 /
# 18.8 ms, 8 rows 19.4 / 19.6, 9 rows 26.5 / 20.2, 10 rows 27.9 / 20.7, 12 rows 30.6 / 22.9).
AMD_BF16_MIN_ROWS = 9


def cpu_vendor() -> str:
    """The CPU's vendor string (GenuineIntel, AuthenticAMD, ...), or "" where unknown."""
    line = cpuinfo_line("vendor_id")
    return line.split(":", 1)[1].strip() if ":" in line else ""


def bf16_min_rows() -> int:
    """Rows from which a bf16-matmul layer multiplies in bf16 on this CPU."""
    if ops.bf16_amx():
        return AMX_BF16_MIN_ROWS
    return AMD_BF16_MIN_ROWS if cpu_vendor() == "AuthenticAMD" else BF16_MIN_ROWS


def onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [m, k] @ w [n, k].T in x's dtype (a new tensor), by oneDNN where it is available."""
    if _ONEDNN:
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return F.linear(x, w)


# Elements of the dequantization scratch (16 MiB of fp32): the LM head goes through in tiles.
_SCRATCH_ELEMS = 1 << 22
_scratch: dict[torch.dtype, torch.Tensor] = {}


def _scratch_buffer(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    buf = _scratch.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = _scratch[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


class QuantizedLinear(nn.Module):
    """y = x @ W.T without bias, W held as GGUF blocks of `wtype` (rows of in/32 blocks).

    matmul_dtype: what a step of more than GEMM_MAX_ROWS rows multiplies in. float32 (the
    default) is the dequantized product to fp32 rounding. bfloat16 (--dtype bfloat16 on a
    CPU with AVX512-BF16 or AMX: models/loader.py) rounds the activations and the dequantized
    weights to bf16 and sums the products in fp32: kernels_cpu's AVX512-BF16 GEMM, which
    dequantizes into its own panels and writes fp32 (2 threads, 3072 x 576: 32 rows 0.21 ms
    against 0.46 in fp32 and 0.30 by oneDNN's bf16 matmul over a dequantized tile; 2048 rows
    11.0, 18.8 and 10.7 ms), else (AMX without AVX512-BF16) that oneDNN matmul, whose bf16
    result is widened back to fp32. Steps of fewer rows stay fp32 either way.
    """

    def __init__(self, blocks: torch.Tensor, wtype: int, in_features: int, out_features: int):
        super().__init__()
        row_bytes = in_features // ops.QK * ops.BLOCK_BYTES.get(wtype, 0)
        if blocks.dtype != torch.uint8 or blocks.numel() != out_features * row_bytes:
            raise ValueError(
                f"blocks of {blocks.numel()} bytes do not hold a {out_features}x{in_features} "
                f"weight of ggml type {wtype}."
            )
        self.in_features, self.out_features, self.wtype = in_features, out_features, wtype
        # uint8 "parameter": counted by weight_bytes(), left alone by Module.to(dtype).
        self.qweight = nn.Parameter(blocks.reshape(-1).contiguous(), requires_grad=False)
        self.matmul_dtype = torch.float32
        # Steps of this many rows or more multiply in matmul_dtype bfloat16 (the loader sets
        # bf16_min_rows() with it); fewer stay fp32.
        self.bf16_min_rows = BF16_MIN_ROWS
        # A Q8_0 weight's blocks also regrouped in the bf16 kernel's panel order
        # (keep_q8_panels), or None.
        self.register_parameter("q8_panels", None)

    def keep_q8_panels(self) -> None:
        """Also hold this Q8_0 weight's blocks regrouped in the bf16 kernel's panel order (the
        same bytes again), so its bf16 steps skip most of the per-product pack (the transpose
        and the scalar scales): for the LM head, whose 49,152 x 576 weight a 32-row decode
        step packed for 2-3 ms of its ~7 (a 2-core Zen 4 VM, 2 threads, wall clock: 32 rows
        7.0-7.3 -> 5.3-5.5 ms, 9 rows 3.3-3.6 -> 2.0; tools/bench_quant.py prints both).
        Needs ops.has_bf16_gemm(); used where the product runs on vdpbf16ps (an AMX CPU's
        tiles take another layout, and pack at a small cost there)."""
        if self.wtype != ops.Q8_0:
            raise ValueError(f"Q8 panels hold Q8_0 blocks, not ggml type {self.wtype}.")
        panels = ops.pack_q8_panels(self.qweight, self.out_features, self.in_features)
        self.q8_panels = nn.Parameter(panels, requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        """The weight as fp32 [out, in] (a new tensor)."""
        return ops.dequantize(self.qweight, self.wtype, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        if (
            x.dim() == 2
            and x.dtype == torch.float32
            and x.shape[0] <= GEMM_MAX_ROWS
            and x.stride(1) == 1
            and (x.shape[0] < self.bf16_min_rows or self.matmul_dtype == torch.float32)
        ):  # the model's own case, ~40 us of Python shorter than the general one below
            return ops.gemm(x, self.qweight, self.wtype, n, k)
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, k)
        if dtype != torch.float32:
            x2 = x2.float()
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        rows = x2.shape[0]
        if self.matmul_dtype == torch.bfloat16 and rows >= self.bf16_min_rows:
            y = self._bf16_matmul(x2)
        elif rows <= GEMM_MAX_ROWS:
            y = ops.gemm(x2, self.qweight, self.wtype, n, k)
        else:
            y = self._dequantized_matmul(x2)
        y = y.reshape(*lead, n)
        return y if dtype == torch.float32 else y.to(dtype)

    def _bf16_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.q8_panels is not None and not ops.bf16_amx():
            return ops.gemm_bf16_q8_panels(x, self.q8_panels, self.out_features, self.in_features)
        if ops.has_bf16_gemm():
            return ops.gemm_bf16(x, self.qweight, self.wtype, self.out_features, self.in_features)
        return self._dequantized_matmul(x.to(torch.bfloat16), torch.bfloat16)

    def _dequantized_matmul(
        self, x: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """x @ W.T (x in dtype), W dequantized to dtype a scratch tile at a time; fp32 out."""
        k, n = self.in_features, self.out_features
        tile = max(1, min(n, _SCRATCH_ELEMS // k))
        if tile == n:
            return onednn_linear(x, self._dequantize_rows(0, n, dtype)).float()
        out = torch.empty(x.shape[0], n, dtype=torch.float32)
        for r0 in range(0, n, tile):
            r1 = min(n, r0 + tile)
            out[:, r0:r1] = onednn_linear(x, self._dequantize_rows(r0, r1, dtype))
        return out

    def _dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        k = self.in_features
        row_bytes = k // ops.QK * ops.BLOCK_BYTES[self.wtype]
        w = self.qweight[r0 * row_bytes : r1 * row_bytes]
        buf = _scratch_buffer((r1 - r0) * k, dtype).view(r1 - r0, k)
        return ops.dequantize(w, self.wtype, r1 - r0, k, out=buf, dtype=dtype)

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, wtype={self.wtype}"
        )
        if self.matmul_dtype != torch.float32:
            text += f", matmul_dtype={self.matmul_dtype}"
        if self.q8_panels is not None:
            text += ", q8_panels=True"
        return text


def quantize_rtn(weight: torch.Tensor, wtype: int) -> QuantizedLinear:
    """A QuantizedLinear holding `weight` [out, in] rounded to nearest in `wtype`'s blocks.

    Q8_0: int8 with one fp16 scale per 32 (absmax / 127); Q4_1: 4 bits with an fp16 scale and
    minimum per 32 ((max - min) / 15), gguf's own quantizers (llama.cpp's reference ones).
    """
    import gguf

    qtypes = {ops.Q8_0: gguf.GGMLQuantizationType.Q8_0, ops.Q4_1: gguf.GGMLQuantizationType.Q4_1}
    if wtype not in qtypes:
        raise ValueError(f"RTN quantization into ggml type {wtype} is not supported.")
    out_features, in_features = weight.shape
    if in_features % ops.QK:
        raise ValueError(
            f"in_features must be a multiple of {ops.QK} to quantize, got {in_features}."
        )
    raw = gguf.quants.quantize(weight.detach().float().cpu().numpy(), qtypes[wtype])
    blocks = torch.from_numpy(raw.reshape(-1).copy())
    return QuantizedLinear(blocks, wtype, in_features, out_features)


class QuantizedEmbedding(nn.Module):
    """Token embedding rows dequantized on lookup from GGUF blocks (shared with a tied head)."""

    def __init__(self, table: QuantizedLinear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.table = table  # [vocab, hidden] as a linear layer's weight
        self.dtype = dtype  # of the rows handed out (the model's activations)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = self.table
        flat = input_ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= t.out_features):
            raise IndexError(f"token id out of range for a vocabulary of {t.out_features}.")
        rows = ops.dequantize(t.qweight, t.wtype, t.out_features, t.in_features, rows=flat)
        rows = rows if self.dtype == torch.float32 else rows.to(self.dtype)
        return rows.reshape(*input_ids.shape, t.in_features)
