"""CUDA graphs for decode steps: one graph per padded batch size, replayed on static buffers.

A decode step launches a few kernels per layer, each a few microseconds of work at small
batch sizes: launch overhead dominates. So pure-decode steps (every row one query token) are
captured once per padded batch size ("bucket": 1, 2, 4, 8, then steps of 8) and replayed.
A step of n rows runs in the smallest bucket >= n: its inputs are copied into the static
buffers, rows n.. are padding, and the output is sliced to the first n rows. Padding rows
write to no cache slot (slot -1, which reshape_and_cache skips) and attend one token of
block 0 (context length 1, a valid block), so they neither change nor read anything harmful.

Everything that sizes a kernel's grid on the host is fixed at capture: the batch (the
bucket), the block table width (max blocks per request) and the decode kernel's bound on the
context (max_model_len), which sets its split along the sequence; the split's workspace is
allocated during capture, from the graph pool. Prefill and mixed steps run eagerly.

`capture` is how a forward is recorded: CudaGraphCapture on a GPU; in CPU tests
`eager_capture`, which "replays" by re-running the forward on the same static buffers, so the
plumbing (copy in, pad, replay, slice out) is checked without a GPU.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch

from engine_core.attention.cuda import CudaAttentionMetadata

logger = logging.getLogger(__name__)

MAX_CAPTURE_SIZE = 512

# Records fn; returns (replay, output): each replay() recomputes output in place from the
# static buffers fn read when it was recorded.
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], object], torch.Tensor]]
Forward = Callable[[torch.Tensor, CudaAttentionMetadata], torch.Tensor]


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Padded batch sizes to capture: 1, 2, 4, 8, then steps of 8, up to the first that holds
    max_num_seqs rows (at most MAX_CAPTURE_SIZE)."""
    assert max_num_seqs >= 1, f"max_num_seqs={max_num_seqs}"
    limit = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = []
    for size in (1, 2, 4, *range(8, MAX_CAPTURE_SIZE + 1, 8)):
        sizes.append(size)
        if size >= limit:
            break
    return sizes


class CudaGraphCapture:
    """Records forwards into torch.cuda.CUDAGraphs that share one memory pool."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: list[torch.cuda.CUDAGraph] = []

    def __call__(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], object], torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        # Captures on a side stream, as torch requires; allocations come from the shared pool.
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self.graphs.append(graph)
        return graph.replay, out


def eager_capture(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], object], torch.Tensor]:
    """A stand-in for CudaGraphCapture without a GPU: replay re-runs fn into the same output."""
    out = fn()
    return (lambda: out.copy_(fn())), out


class DecodeGraphs:
    """Pure-decode steps replayed from graphs captured per padded batch size.

    forward(input_ids, meta) -> hidden states [T, hidden] is the model on the KV cache.
    """

    def __init__(
        self,
        forward: Forward,
        sizes: list[int],
        max_blocks_per_req: int,
        max_context_len: int,
        device: torch.device,
        capture: Capture,
    ) -> None:
        self.forward = forward
        self.sizes = sorted(sizes)
        self.max_context_len = max_context_len
        self._capture = capture
        self._graphs: dict[int, tuple[Callable[[], object], torch.Tensor]] = {}
        self.capture_time_s = 0.0
        n = self.sizes[-1]
        # Static inputs, in their padding state: a row that is never filled writes nowhere.
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_req, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self._no_prefill = torch.zeros(1, dtype=torch.int32, device=device)

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def bucket(self, num_rows: int) -> int | None:
        """The smallest captured size holding num_rows rows (None: too many)."""
        i = bisect.bisect_left(self.sizes, num_rows)
        return self.sizes[i] if i < len(self.sizes) else None

    def padded_forward(self, size: int) -> torch.Tensor:
        """The forward on the first `size` rows of the static buffers (what a graph records)."""
        empty = slice(size, size)
        meta = CudaAttentionMetadata(
            positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size],
            num_decode_tokens=size,
            decode_block_tables=self.block_tables[:size],
            decode_context_lens=self.context_lens[:size],
            max_decode_context_len=self.max_context_len,
            prefill_block_tables=self.block_tables[empty],
            prefill_context_lens=self.context_lens[empty],
            prefill_cu_seqlens_q=self._no_prefill,
            max_prefill_query_len=0,
        )
        return self.forward(self.input_ids[:size], meta)

    def capture(self) -> float:
        """Capture every size, largest first (smaller ones reuse its pool); returns seconds."""
        t0 = time.perf_counter()
        for size in reversed(self.sizes):
            # Warm-up: kernels compiled and loaded, the allocator settled, before recording.
            self.padded_forward(size)
            try:
                self._graphs[size] = self._capture(lambda size=size: self.padded_forward(size))
            except RuntimeError as e:
                raise RuntimeError(
                    f"capturing the decode CUDA graph of batch size {size} failed: {e} "
                    "(enforce_eager / --enforce-eager runs without graphs)"
                ) from e
        if self.input_ids.is_cuda:
            torch.cuda.synchronize(self.input_ids.device)
        self.capture_time_s = time.perf_counter() - t0
        logger.info(
            "captured %d CUDA graphs in %.2f s (decode batch sizes %d..%d)",
            len(self._graphs),
            self.capture_time_s,
            self.sizes[0],
            self.sizes[-1],
        )
        return self.capture_time_s

    def can_run(self, meta: CudaAttentionMetadata) -> bool:
        """Whether a step is pure decode and fits a captured size."""
        return (
            self.captured
            and meta.num_decode_tokens == meta.num_tokens
            and self.bucket(meta.num_tokens) is not None
        )

    def run(self, input_ids: torch.Tensor, meta: CudaAttentionMetadata) -> torch.Tensor:
        """Hidden states [n, hidden] of a pure-decode step, by replaying its bucket's graph.

        The result lives in the graph's output buffer: use it before the next replay.
        """
        n = meta.num_tokens
        size = self.bucket(n)
        width = meta.decode_block_tables.shape[1]
        assert self.can_run(meta) and size is not None, f"{n} rows do not fit the graphs"
        assert width <= self.block_tables.shape[1], f"block tables {width} wide"
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(meta.positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.block_tables[:n, :width].copy_(meta.decode_block_tables)
        self.context_lens[:n].copy_(meta.decode_context_lens)
        # Rows a larger step filled before are padding now. Their other inputs keep valid
        # values (token ids, positions, block ids written before), so only these two matter.
        self.slot_mapping[n:size].fill_(-1)
        self.context_lens[n:size].fill_(1)
        replay, out = self._graphs[size]
        replay()
        return out[:n]
