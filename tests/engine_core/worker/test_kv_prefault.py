"""The host KV cache's pages are faulted in ahead of the blocks in use, and only those."""

from __future__ import annotations

import ctypes
import mmap
import sys
import time

import numpy as np
import pytest

from engine_core.worker.host_memory import KVPrefault

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="madvise/mincore are Linux's")

PAGE = mmap.PAGESIZE


def resident_pages(buffer: np.ndarray) -> np.ndarray:
    """Per page of the buffer's page-aligned span: whether it is in memory (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    base = buffer.ctypes.data
    lo, hi = -(-base // PAGE) * PAGE, (base + buffer.nbytes) // PAGE * PAGE
    vec = np.zeros((hi - lo) // PAGE, dtype=np.uint8)
    assert libc.mincore(lo, hi - lo, vec.ctypes.data) == 0, ctypes.get_errno()
    return (vec & 1).astype(bool)


def wait_for(prefault: KVPrefault, blocks: int) -> None:
    deadline = time.monotonic() + 10
    while prefault.done < blocks:
        assert time.monotonic() < deadline, f"prefault stuck at {prefault.done} of {blocks}"
        time.sleep(0.01)


def test_prefault_keeps_the_blocks_ahead_of_use_resident_and_leaves_the_rest():
    # A fresh anonymous mapping: untouched pages (np.zeros in a long process may get memory
    # calloc reuses, already resident). Blocks of 2 MiB: with transparent huge pages,
    # residency comes in 2 MiB steps; one block of slack at each boundary for alignment.
    pools, num_blocks, block_bytes = 2, 24, 2 << 20
    mapping = mmap.mmap(-1, pools * num_blocks * block_bytes)
    buffer = np.frombuffer(mapping, dtype=np.uint8)
    per_block = block_bytes // PAGE
    pool_pages = num_blocks * per_block

    def check(populated: int) -> None:
        pages = resident_pages(buffer)
        for p in range(pools):
            start = p * pool_pages
            assert pages[start + 1 : start + (populated - 1) * per_block].all(), f"pool {p}"
            # (the next pool's first block may share a huge page with this one's last)
            assert not pages[
                start + (populated + 1) * per_block : start + pool_pages - per_block
            ].any()

    assert resident_pages(buffer).sum() <= 2 * 512  # calloc'd: untouched but at the edges
    prefault = KVPrefault(buffer, pools, num_blocks, ahead=4)
    wait_for(prefault, 4)
    check(4)
    prefault.advance(10)  # a step used blocks up to 10: 4 past it are faulted in too
    wait_for(prefault, 15)
    check(15)
    prefault.advance(10_000)  # clipped to the pool
    wait_for(prefault, num_blocks)
    assert resident_pages(buffer)[1:-1].all()
    assert not buffer.any()  # nothing written
