"""Building blocks of the Llama forward pass: RMSNorm, rotary embedding and linear layers.

Linear layers on a CPU run through oneDNN with the weight packed once at load
(`torch.ops.mkldnn._linear_pointwise`, what inductor's freezing pass uses), faster than aten's
`F.linear` at every batch size (docs/architecture.md has the figures). The packing only
reorders the weight: values and dtype are unchanged.

RMSNorm's math is its path's (models/ops.py: `native` torch code or `cuda` kernels), set once
when the runner picks its attention backend.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from engine_core.models.ops import ModelOps


def _onednn_available() -> bool:
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2))
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), w, None, "none", [], "")
        return torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = None


def onednn_linear_available() -> bool:
    """Whether this torch build can pack fp32 linear weights for oneDNN (probed once)."""
    global _ONEDNN
    if _ONEDNN is None:
        _ONEDNN = _onednn_available()
    return _ONEDNN


class Linear(nn.Module):
    """y = x @ W.T without bias; `pack()` swaps W for a oneDNN-packed copy on a CPU."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.packed: torch.Tensor | None = None

    def pack(self) -> None:
        """Pack the weight for oneDNN when it helps: fp32 on a CPU with a oneDNN build."""
        w = self.weight
        if w.device.type == "cpu" and w.dtype == torch.float32 and onednn_linear_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach())
            # The packed copy is all the forward needs: drop the plain one (half the memory).
            self.weight = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return F.linear(x, self.weight)


class RMSNorm(nn.Module):
    """Llama's RMSNorm; given a residual it adds it first and returns the new residual too."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.ops: ModelOps = _native_ops()

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.rms_norm(x, residual, self.weight, self.eps)


def _native_ops() -> ModelOps:
    from engine_core.models.ops import NATIVE_OPS  # ops.py builds on this module

    return NATIVE_OPS


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] for plain, `linear` or `llama3` RoPE (transformers' math)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope scaling type {rope_type!r} is not supported.")


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with cos/sin tables precomputed for every position up to max_positions."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        self._inv_freq, self._max_positions = inv_freq, max_positions
        freqs = _rope_angles(inv_freq, max_positions)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self._fp32_tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, head_dim/2] tables for one step, gathered once and shared by all layers."""
        if positions.numel() and int(positions.max()) >= self.cos.shape[0]:
            raise ValueError(
                f"position {int(positions.max())} is beyond the rotary table ({self.cos.shape[0]})."
            )
        cos = self.cos.index_select(0, positions).to(dtype)
        sin = self.sin.index_select(0, positions).to(dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def kernel_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (cos, sin) [max_positions, head_dim/2] on the buffers' device, for the kernel.

        Module.to(bfloat16) rounds the buffers; the kernel wants the fp32 tables, rebuilt
        here once per device with the same bits the buffers had before rounding.
        """
        tables, device = self._fp32_tables, self.cos.device
        if tables is None or tables[0].device != device:
            freqs = _rope_angles(self._inv_freq, self._max_positions)
            tables = (freqs.cos().to(device), freqs.sin().to(device))
            self._fp32_tables = tables
        return tables


def _rope_angles(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    # position * inv_freq in fp32, as transformers computes it: the same cos/sin bits.
    positions = torch.arange(max_positions, device=inv_freq.device).float()
    return positions[:, None] * inv_freq[None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by position: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused [gate | up] projection."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
