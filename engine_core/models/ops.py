"""The model's fused ops, one table per path: `native` (torch) and `cuda` (kernels_cuda.ops).

The layers call `self.ops.<op>` and know no path; the attention backend chosen when the
runner is built carries its table (engine_core/attention/), and the model hands it to its
layers once (`LlamaForCausalLM.set_attention_backend`). Same math on both paths; the cuda
table works in place where the kernels do. On CPU tensors kernels_cuda.ops runs its torch
references, so the cuda table also runs (slowly) without a GPU.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from engine_core.models.layers import RotaryEmbedding, apply_rope, silu_and_mul
from kernels_cpu import ops as cpu_ops
from kernels_cuda import ops


class ModelOps(Protocol):
    """Norm, rotary embedding and activation of one path."""

    name: str

    def rope_tables(
        self, rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for one step, computed once and shared by every layer."""
        ...

    def rotate(
        self,
        qk: torch.Tensor,
        num_q_heads: int,
        positions: torch.Tensor,
        tables: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """qk [T, num_q_heads + kv_heads, head_dim] rotated by position (maybe in place)."""
        ...

    def rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm of x (+ residual first, if given): (normalized, new residual)."""
        ...

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU on a fused [gate | up] projection."""
        ...


def _cpu_fp32(x: torch.Tensor) -> bool:
    """Whether kernels_cpu's fused op takes x: fp32 on a CPU, the library built."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and cpu_ops.available()


class NativeOps:
    """torch ops, the CUDA kernels' oracle; fp32 on a CPU runs kernels_cpu's fused versions
    (the same math in one call each; tests/kernels_cpu checks them against these torch ops)."""

    name = "native"

    def rope_tables(
        self, rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary.cos_sin(positions, dtype)

    def rotate(
        self,
        qk: torch.Tensor,
        num_q_heads: int,
        positions: torch.Tensor,
        tables: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        if _cpu_fp32(qk) and qk.stride(2) == 1 and qk.stride(1) == qk.shape[2]:
            return cpu_ops.rope_(qk, *tables)
        return apply_rope(qk, *tables)

    def rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if (
            _cpu_fp32(x)
            and x.dim() == 2
            and x.is_contiguous()
            and weight.dtype == torch.float32
            and (residual is None or residual.is_contiguous())
        ):
            return cpu_ops.add_rms_norm(x, residual, weight, eps)
        if residual is not None:
            x = x + residual
        residual = x
        if x.dtype == torch.float32:
            return F.rms_norm(x, weight.shape, weight, eps), residual
        # Low-precision activations: normalize in fp32 as transformers does.
        h = F.rms_norm(x.float(), weight.shape, None, eps)
        return weight * h.to(x.dtype), residual

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_fp32(x) and x.dim() == 2 and x.is_contiguous():
            return cpu_ops.silu_and_mul(x)
        return silu_and_mul(x)


class CudaOps:
    """kernels_cuda.ops: one kernel each, in place where the kernel works in place."""

    name = "cuda"

    def rope_tables(
        self, rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary.kernel_tables()  # the kernel gathers by position itself

    def rotate(
        self,
        qk: torch.Tensor,
        num_q_heads: int,
        positions: torch.Tensor,
        tables: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        q, k = qk[:, :num_q_heads], qk[:, num_q_heads:]
        ops.rotary_embedding(positions, q, k, *tables, qk.shape[2])
        return qk

    def rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return ops.rms_norm(torch.empty_like(x), x, weight, eps), x
        ops.fused_add_rms_norm(x, residual, weight, eps)  # x and residual change in place
        return x, residual

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype, device=x.device)
        return ops.silu_and_mul(out, x)


NATIVE_OPS = NativeOps()
CUDA_OPS = CudaOps()
