"""Paged attention over the KV cache, behind one interface with two implementations.

`native` (torch_paged.py): torch code; the CPU path, and the oracle the kernels are checked
against. `cuda` (cuda.py): the NVRTC kernels of kernels_cuda.ops. The runner picks one when
it is built (`choose_backend`, `make_backend`) and hands it to the model, whose attention
layers call `backend(q, k, v, kv_cache, meta)` and know no path. A backend also carries the
path's fused ops (models/ops.py: norms, rotary embedding, activation).

Both share the cache layout (per layer a K and a V pool [num_blocks, block_size,
num_kv_heads, head_dim]) and the step layout of common.py.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from engine_core.attention.common import StepInputs, StepLayout

if TYPE_CHECKING:  # models/ imports the native backend: no cycle at run time
    from engine_core.models.ops import ModelOps

logger = logging.getLogger(__name__)

BACKENDS = ("native", "cuda")


class StepMetadata(Protocol):
    """What every backend's metadata holds for the model (the rest is the backend's own)."""

    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64


class AttentionBackend:
    """Build a step's metadata, write the step's K/V, attend: one path's paged attention."""

    name: str
    ops: ModelOps

    def prepare(
        self, input_ids: np.ndarray, layout: StepLayout, logits_indices: np.ndarray
    ) -> StepInputs:
        """The step's device inputs, with this backend's metadata built from the layout."""
        raise NotImplementedError

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: Any) -> None:
        """Store the step's k, v [T, kv_heads, head_dim] at their slots of kv_cache [2, ...]."""
        raise NotImplementedError

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: Any
    ) -> torch.Tensor:
        """Attention of q [T, heads, head_dim] over each row's context: [T, heads * head_dim]."""
        raise NotImplementedError

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: Any
    ) -> torch.Tensor:
        """Write k, v, then attend. Every row's K/V is written before any row attends: a row
        may read blocks that another row of the same step fills (a shared prefix)."""
        self.write_kv(k, v, kv_cache, meta)
        return self.attend(q, k, v, kv_cache, meta)


def choose_backend(
    requested: str | None,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    hidden_size: int,
    intermediate_size: int,
) -> str:
    """`requested`, checked; None: `cuda` on a GPU when the kernels take the model, else `native`.

    On a CPU the kernels' torch references take any shape, so `cuda` runs there too (tests
    use it to check the path's plumbing).
    """
    from engine_core.attention.cuda import unsupported_by_kernels

    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {requested!r}.")
    why_not = None
    if device.type == "cuda":
        why_not = unsupported_by_kernels(dtype, head_dim, hidden_size, intermediate_size)
    if requested is None:
        if device.type == "cuda" and why_not is not None:
            logger.info("CUDA kernels off (%s): running the native attention path", why_not)
        return "cuda" if device.type == "cuda" and why_not is None else "native"
    if requested == "cuda" and why_not is not None:
        raise ValueError(f"attention backend 'cuda' was asked for, but {why_not}.")
    return requested


def make_backend(
    name: str, device: torch.device, dtype: torch.dtype, staging_bytes: int
) -> AttentionBackend:
    """The backend `name` for a runner on device in dtype (staging_bytes: the cuda path's
    initial pinned buffer for a step's inputs)."""
    if name == "cuda":
        from engine_core.attention.cuda import CudaBackend
        from engine_core.worker.staging import PinnedStaging

        return CudaBackend(PinnedStaging(staging_bytes, device))
    from engine_core.attention.torch_paged import NativeBackend

    return NativeBackend(device, dtype)
