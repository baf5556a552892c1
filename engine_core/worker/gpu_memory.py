"""Sizing the KV cache on a GPU: profile the largest step, give the rest of the budget to KV.

As vLLM does: after the weights are loaded, one prefill forward at the step budget (plus a
sampler call at max_num_seqs rows, and the largest decode graph's batch run eagerly) on a
scratch cache shows the activations' peak; the KV cache gets total * gpu_memory_utilization
minus what is in use, that peak, and a reserve for the CUDA graphs and a margin.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Kept free beyond the profiled peaks for what the profile does not see: the allocator's
# rounding, the graph capture stream's cuBLAS workspace, fragmentation.
_CUDA_MARGIN_BYTES = 256 * 2**20
_GIB = 2**30


def profile_num_blocks(
    device: torch.device,
    utilization: float,
    block_bytes: int,
    block_size: int,
    largest_step: Callable[[], None],
    largest_graph: Callable[[], None] | None,
) -> int:
    """KV blocks for gpu_memory_utilization, after profiling the largest steps' memory.

    largest_step runs the biggest step the scheduler can produce (on a scratch cache);
    largest_graph, when decode graphs are captured, the largest graph's eager twin.
    """
    activations = _peak_bytes(device, largest_step)
    # The graphs' shared pool holds about what the largest graph's eager twin peaks at.
    graphs = _peak_bytes(device, largest_graph) if largest_graph is not None else 0
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    num_blocks = kv_cache_blocks(
        total,
        utilization,
        in_use=total - free,
        activations=max(activations, graphs),
        reserve=graphs + _CUDA_MARGIN_BYTES,
        block_bytes=block_bytes,
    )
    logger.info(
        "KV cache: %d blocks = %d tokens (%.2f GiB) of %.2f GiB x %.2f; %.2f GiB in use "
        "after loading, peak activations %.2f GiB, CUDA graphs %.2f GiB",
        num_blocks,
        num_blocks * block_size,
        num_blocks * block_bytes / _GIB,
        total / _GIB,
        utilization,
        (total - free) / _GIB,
        activations / _GIB,
        graphs / _GIB,
    )
    return num_blocks


def _peak_bytes(device: torch.device, fn: Callable[[], None]) -> int:
    """How far above what was allocated before fn's allocations peaked."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def profile_step_shape(
    num_tokens: int, max_num_seqs: int, max_model_len: int, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The memory profile's step: num_tokens prompt tokens split evenly over as many rows as
    max_num_seqs allows (none longer than max_model_len), as vLLM's dummy run does; and
    block tables giving every row its own consecutive blocks from 0."""
    rows = max(min(max_num_seqs, num_tokens), -(-num_tokens // max_model_len))
    query_lens = np.full(rows, num_tokens // rows, dtype=np.int64)
    query_lens[: num_tokens % rows] += 1
    blocks = -(-query_lens // block_size)
    first = np.cumsum(blocks) - blocks
    table = first[:, None] + np.arange(int(blocks.max()), dtype=np.int64)[None, :]
    return query_lens, np.minimum(table, (first + blocks - 1)[:, None])


def kv_cache_blocks(
    total: int,
    utilization: float,
    in_use: int,
    activations: int,
    reserve: int,
    block_bytes: int,
) -> int:
    """KV blocks that fit in total * utilization beside what is in use (weights, CUDA context,
    other processes), the profiled peak activations and a reserve (CUDA graphs, margin)."""
    budget = total * utilization - in_use - activations - reserve
    num_blocks = max(0, int(budget // block_bytes))
    if num_blocks < 2:
        raise ValueError(
            f"gpu_memory_utilization={utilization} allows {total * utilization / _GIB:.2f} GiB "
            f"of the GPU's {total / _GIB:.2f} GiB, but {in_use / _GIB:.2f} GiB are in use "
            f"(weights, CUDA context, other processes), the largest step's activations take "
            f"{activations / _GIB:.2f} GiB and {reserve / _GIB:.2f} GiB are kept for CUDA "
            f"graphs and a margin: {budget / _GIB:.3f} GiB is left for the KV cache, fewer than "
            f"2 blocks of {block_bytes} bytes. Raise gpu_memory_utilization, or lower "
            f"max_num_batched_tokens or max_num_seqs (or pass enforce_eager)."
        )
    return num_blocks
