"""The runner's runs without requests: sizing the KV cache (a budget on the host, a profiled
forward on a GPU), the largest step's profile, and the warm-up before the first request."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from engine_core.attention.common import step_layout
from engine_core.protocol import SamplingParams
from engine_core.sample.sampler import SamplingMetadata
from engine_core.worker import gpu_memory

if TYPE_CHECKING:
    from engine_core.worker.model_runner import ModelRunner


def num_blocks_for_memory(runner: ModelRunner) -> int:
    cfg = runner.model_config
    elem = torch.tensor([], dtype=runner.kv_cache_dtype).element_size()
    block_bytes = 2 * cfg.num_layers * runner.block_size * runner.num_kv_heads * cfg.head_dim * elem
    if runner.config.num_gpu_blocks_override is not None:
        return runner.config.num_gpu_blocks_override
    if runner.device.type == "cuda":
        return profile_num_blocks(runner, block_bytes)
    budget = runner.config.kv_cache_space_gib * 2**30
    num_blocks = int(budget // block_bytes)
    if num_blocks < 2:
        raise ValueError(
            f"the KV cache budget ({budget / 2**30:.3f} GiB) holds {num_blocks} blocks of "
            f"{block_bytes} bytes; at least 2 are needed (raise kv_cache_space_gib or "
            f"gpu_memory_utilization)."
        )
    return num_blocks


def profile_num_blocks(runner: ModelRunner, block_bytes: int) -> int:
    """On a GPU: what gpu_memory_utilization leaves after the largest step, profiled on a
    scratch cache that is dropped after."""
    query_lens, table = gpu_memory.profile_step_shape(
        runner.max_num_batched_tokens,
        runner.config.max_num_seqs,
        runner.max_model_len,
        runner.block_size,
    )
    graphs = runner.cuda_graphs
    runner.kv_cache = runner.new_kv_cache(int(table.max()) + 1)
    try:
        return gpu_memory.profile_num_blocks(
            runner.device,
            runner.config.gpu_memory_utilization,
            block_bytes,
            runner.block_size,
            lambda: runner.profile_run(query_lens, table),
            None if graphs is None else lambda: graphs.padded_forward(graphs.sizes[-1]),
        )
    finally:
        runner.kv_cache = None


@torch.inference_mode()
def profile_run(runner: ModelRunner, query_lens: np.ndarray, block_table: np.ndarray) -> None:
    """A prefill forward of rows query_lens over block_table, then the sampler at
    max_num_seqs rows (random sampling, its costliest path): the largest step's memory.

    It writes into runner.kv_cache at the table's blocks.
    """
    hidden = dummy_forward(runner, query_lens, np.zeros_like(query_lens), block_table)
    rows = runner.config.max_num_seqs
    logits = runner.model.compute_logits(hidden[-1:].expand(rows, -1).contiguous())
    if logits is None:  # a tensor-parallel rank other than 0: no sampling
        return
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50)
    md = SamplingMetadata.build(
        [params] * rows,
        [[0]] * rows,
        [[]] * rows,
        [None] * rows,
        runner.model_config.vocab_size,
        runner.device,
    )
    runner.sampler(logits, md)


# The CPU warm-up's prompt: a short prefill still takes the paths a real one does (the
# tiled quantized GEMM above its few-row kernel, the prefill attention) at a fraction of the
# cost of a longer one; every forward reads all the weights whatever its length.
_CPU_WARMUP_TOKENS = 16


@torch.inference_mode()
def warmup(runner: ModelRunner) -> None:
    """Run the forwards a first request runs, once, so that it does not pay their one-time
    costs; then capture the decode CUDA graphs (once) if the runner uses them.

    On a CPU, a short prefill then a decode step (the first request's two step kinds; a
    mixed step adds no first-use cost there but the time of a forward). On a GPU, also a
    mixed step (prefill with context beside a decode row): each kernel variant compiles at
    first use. It writes into the first blocks of the KV cache, which hold no request yet.
    """
    cap = runner.num_blocks * runner.block_size
    if runner.device.type == "cpu":
        n = min(_CPU_WARMUP_TOKENS, runner.max_model_len, cap) - 1
        steps = [([n], [0]), ([1], [n])]
    else:
        n = min(2 * runner.block_size, runner.max_model_len, cap) - 1
        steps = [([n], [0]), ([1, n - 1], [n, 1]), ([1], [n])]
    if n >= 1:
        _warmup_steps(runner, n, steps)
    if runner.cuda_graphs is not None and not runner.cuda_graphs.captured:
        runner.cuda_graphs.capture()


def _warmup_steps(runner: ModelRunner, n: int, steps: list[tuple[list[int], list[int]]]) -> None:
    table = np.arange(-(-(n + 1) // runner.block_size), dtype=np.int64)[None, :].repeat(2, 0)
    for query_lens, computed in steps:
        hidden = dummy_forward(runner, np.array(query_lens), np.array(computed), table)
        logits = runner.model.compute_logits(hidden[-1:])
        if logits is None:  # a tensor-parallel rank other than 0: no sampling
            continue
        md = SamplingMetadata.build(
            [SamplingParams(temperature=0.0)],
            [[0]],
            [[]],
            [None],
            runner.model_config.vocab_size,
            runner.device,
        )
        runner.sampler(logits, md)
    runner.kv_cache[:, :, : table.shape[1]].zero_()


def dummy_forward(
    runner: ModelRunner, query_lens: np.ndarray, num_computed: np.ndarray, block_table: np.ndarray
) -> torch.Tensor:
    """A forward of token id 0 at every position of rows (query_lens, num_computed)."""
    num_tokens = int(query_lens.sum())
    layout = step_layout(
        query_lens, num_computed, block_table[: len(query_lens)], runner.block_size
    )
    no_logits = np.zeros(0, dtype=np.int64)
    step = runner.attn_backend.prepare(np.zeros(num_tokens, dtype=np.int64), layout, no_logits)
    return runner.model(step.input_ids, step.meta, runner.kv_cache)
