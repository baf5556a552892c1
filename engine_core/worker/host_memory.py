"""Host memory of the process that runs the model: malloc's thresholds for a step's buffers,
the KV cache's buffer on huge pages, and its pages faulted in ahead of use (all called by
model_runner.py)."""

from __future__ import annotations

import logging
import threading

import numpy as np

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_HEAP_BUFFERS_BELOW = 1 << 30


def keep_step_buffers_in_the_heap() -> None:
    """Make glibc's malloc serve a CPU step's large tensors from its heap and keep what they
    free there, for this process (the one that runs the model).

    By default a buffer of more than 128 KiB-32 MiB is its own mmap, unmapped when freed: a
    2048-token prefill allocates ~700 such buffers (qkv, gate_up, ... of every layer), and
    each one's pages are faulted in and zeroed again by the kernel on first write (~90 ms of
    torch.empty and more in the writes, a 2048-token step). With the thresholds raised the
    freed buffers are reused as they are (vLLM-CPU preloads tcmalloc for the same reason):
    prefill 1,900-2,200 -> 2,150-2,470 tokens/s, batch32 in bf16 387-400 -> 418-437 new
    tok/s here. The KV cache (a larger calloc) stays its own lazily faulted mapping. Memory
    a step frees stays with the process for the next one: its peak, not more.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for param in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD):
        if not mallopt(param, _HEAP_BUFFERS_BELOW):
            logger.debug("mallopt(%d) refused", param)


_MADV_POPULATE_WRITE = 23  # Linux 5.14+


def kv_cache_buffer(nbytes: int) -> np.ndarray:
    """A zeroed host buffer of nbytes for the KV cache, its pages faulted in lazily, on 2 MiB
    transparent huge pages where the kernel gives them.

    A decode step's attention reads each row's blocks, scattered over the pool: with 4 KiB
    pages nearly every block of a layer's K or V is another TLB miss (a page walk), with
    2 MiB pages one in ~340 (32 rows x 400 keys, bf16, 30 layers' own pools, 2 threads, one
    process reading both buffers in turn: 25.3 -> 24.8 ms over blocks in order, 21.0 -> 20.0
    ms over shuffled blocks). A private anonymous mapping, advised MADV_HUGEPAGE (the
    kernel's default THP mode here is `madvise`); where that is refused it stays a plain one.
    """
    import mmap

    mm = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            mm.madvise(advice)
        except OSError as e:  # a kernel without THP
            logger.debug("KV cache: MADV_HUGEPAGE refused (%s)", e)
    return np.frombuffer(mm, dtype=np.uint8, count=nbytes)


class KVPrefault:
    """Faults the host KV cache's pages in on a background thread, ahead of the blocks in use.

    The cache's pages are calloc'd (start-up does not write the pool). Left to the steps, the
    first touch of each page is a fault inside a step's critical path: on this project's VMs
    ~13 us a 4 KiB page where the hypervisor has not backed it yet, ~0.3 s of a 2048-token
    prefill step (tools/bench_throughput.py's batch32 has four). madvise(MADV_POPULATE_WRITE)
    does that work in the kernel, without the GIL (~10 us a page cold, 0.2 us warm), on a
    thread that runs while start-up finishes, between requests and beside the steps' Python.
    The block pool hands out the lowest free ids first, so the thread keeps `ahead` blocks
    past the highest id a step has used populated in every layer's K and V pool (`advance`):
    a cache the workload never fills is not faulted in whole. Nothing is written (the pages
    stay zero). Where the kernel lacks the call, the thread stops at its first chunk.
    """

    def __init__(self, buffer: np.ndarray, pools: int, num_blocks: int, ahead: int) -> None:
        import ctypes

        self._buffer, self._pools, self.num_blocks = buffer, pools, num_blocks
        self.ahead = ahead
        self._target, self.done = min(num_blocks, ahead), 0
        self._cv = threading.Condition()
        libc = ctypes.CDLL(None, use_errno=True)
        self._madvise = libc.madvise
        self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._thread = threading.Thread(target=self._run, name="kv-prefault", daemon=True)
        self._thread.start()

    def advance(self, highest_block: int) -> None:
        """A step uses blocks up to `highest_block`: keep `ahead` more populated."""
        target = min(self.num_blocks, highest_block + 1 + self.ahead)
        if target > self._target:
            with self._cv:
                self._target = target
                self._cv.notify()

    def _run(self) -> None:
        import ctypes
        import mmap

        page = mmap.PAGESIZE
        base, nbytes = self._buffer.ctypes.data, self._buffer.nbytes
        lo, hi = -(-base // page) * page, (base + nbytes) // page * page
        pool_bytes = nbytes // self._pools
        block_bytes = pool_bytes // max(self.num_blocks, 1)
        step = max(1, (4 << 20) // max(block_bytes, 1))  # blocks a round: ~4 MiB of a pool
        while self.done < self.num_blocks:
            with self._cv:
                while self.done >= self._target:
                    self._cv.wait()
                target = self._target
            for b0 in range(self.done, target, step):
                b1 = min(target, b0 + step)
                for p in range(self._pools):
                    start = base + p * pool_bytes + b0 * block_bytes
                    end = base + p * pool_bytes + b1 * block_bytes
                    start, end = max(lo, start // page * page), min(hi, -(-end // page) * page)
                    if end > start and self._madvise(start, end - start, _MADV_POPULATE_WRITE):
                        logger.debug("KV cache prefault stopped: errno %d", ctypes.get_errno())
                        return
                self.done = b1
