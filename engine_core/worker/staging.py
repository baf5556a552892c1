"""PinnedStaging: a step's host-built input arrays moved to the device with one copy."""

from __future__ import annotations

import numpy as np
import torch


class PinnedStaging:
    """Moves a step's host-built input arrays to the device with one copy (the cuda backend).

    vLLM V1's CpuGpuBuffer idea, merged into one buffer: the arrays are packed at 16-byte
    aligned offsets into one pinned host buffer, copied in one non-blocking transfer into a
    preallocated device buffer, and handed out as typed views of it. Nothing is allocated per
    step. On a CPU the "device" buffer is a second host buffer, so the same code runs.
    """

    ALIGN = 16

    def __init__(self, capacity_bytes: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._copied = torch.cuda.Event() if self._cuda else None
        self._allocate(max(capacity_bytes, self.ALIGN))

    def _allocate(self, capacity: int) -> None:
        self.capacity = capacity
        self.host = torch.zeros(capacity, dtype=torch.uint8, pin_memory=self._cuda)
        self._host_np = self.host.numpy()
        self.device_buffer = torch.zeros(capacity, dtype=torch.uint8, device=self.device)

    def stage(self, arrays: dict[str, tuple[np.ndarray, torch.dtype]]) -> dict[str, torch.Tensor]:
        """Device tensors (same names and shapes, the given dtypes) holding `arrays`' values."""
        layout, total = [], 0
        for name, (array, dtype) in arrays.items():
            nbytes = array.size * dtype.itemsize
            layout.append((name, array, dtype, total, nbytes))
            total += -(-nbytes // self.ALIGN) * self.ALIGN
        if self._cuda:
            # The previous step's copy may still be reading the pinned buffer.
            self._copied.synchronize()
        if total > self.capacity:
            self._allocate(max(total, 2 * self.capacity))
        for _, array, dtype, offset, nbytes in layout:
            view = self._host_np[offset : offset + nbytes].view(_NUMPY_DTYPES[dtype])
            view[:] = array.reshape(-1)
        self.device_buffer[:total].copy_(self.host[:total], non_blocking=self._cuda)
        if self._cuda:
            self._copied.record()
        return {
            name: self.device_buffer[offset : offset + nbytes].view(dtype).view(array.shape)
            for name, array, dtype, offset, nbytes in layout
        }


_NUMPY_DTYPES = {
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.float32: np.float32,
}
