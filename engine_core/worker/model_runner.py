"""ModelRunner: runs one scheduled step of the model over the paged KV cache and samples.

The scheduler owns request state; the runner mirrors what it needs in a persistent
InputBatch, updated from each SchedulerOutput's diffs. Per step it computes, for every
scheduled request, tokens [num_computed, num_computed + n) of its token ids; a request whose
tokens are then all computed is sampled (logits only for its last position), a partial
prefill chunk is not. Sampled tokens are not appended here: the scheduler sends them back
as the next step's CachedRequestData.new_token_ids.

With tensor parallelism one runner runs in each worker process, on its shard of the model
and its KV heads; every rank applies the same SchedulerOutput and runs the same forward (the
collectives need all of them), and only rank 0 samples.

The attention backend (engine_core/attention/) is chosen once, here: `native` on a CPU,
`cuda` (the NVRTC kernels) on a GPU that the kernels support. The runner builds each step's
layout on the host (attention/common.py) and the backend turns it into its device inputs.
On the cuda backend, pure decode steps replay CUDA graphs (cuda_graphs.py) unless
config.enforce_eager; on a GPU the KV cache gets what a profiled forward at the largest step
leaves of gpu_memory_utilization (gpu_memory.py).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from engine_core import distributed
from engine_core.attention import choose_backend, make_backend
from engine_core.attention.common import StepInputs, step_layout, token_positions
from engine_core.config import EngineConfig
from engine_core.models.loader import load_model, load_model_config
from engine_core.protocol import (
    GrammarOutput,
    ModelRunnerOutput,
    SchedulerOutput,
    WorkerModelConfig,
)
from engine_core.sample.rejection_sampler import RejectionSampler, verify_drafts
from engine_core.sample.sampler import Sampler, sample_states
from engine_core.structured_output.bitmask import apply_grammar_bitmask
from engine_core.worker import dummy_runs
from engine_core.worker.cuda_graphs import Capture, CudaGraphCapture, DecodeGraphs, capture_sizes
from engine_core.worker.host_memory import (
    KVPrefault,
    keep_step_buffers_in_the_heap,
    kv_cache_buffer,
)
from engine_core.worker.input_batch import InputBatch

logger = logging.getLogger(__name__)

_MAX_DEFAULT_MODEL_LEN = 8192


class ModelRunner:
    """Owns the model, its KV cache and the persistent batch; `execute_model` is one step.

    tp_rank: this process's rank when config.tensor_parallel_size > 1 (the process must be in
    the engine's process group); device: where it runs, by default from config.device.
    attention_backend: `native` or `cuda`; None: `cuda` on a GPU when the kernels support the
    model and dtype, else `native`. On a CPU `cuda` runs the kernels' torch references: tests
    use it to check the path's plumbing. graph_capture: how to record decode graphs on the
    cuda backend; None: CUDA graphs on CUDA with one rank, none elsewhere.
    config.enforce_eager turns graphs off either way.
    """

    def __init__(
        self,
        config: EngineConfig,
        tp_rank: int = 0,
        device: torch.device | None = None,
        *,
        attention_backend: str | None = None,
        graph_capture: Capture | None = None,
    ) -> None:
        self.config = config
        self.tp_rank, self.tp_size = tp_rank, config.tensor_parallel_size
        if self.tp_size > 1:
            distributed.require_group(self.tp_size)
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = device if device is not None else _resolve_device(config.device)
        if self.device.type == "cpu":
            keep_step_buffers_in_the_heap()
        torch.manual_seed(config.seed)
        self.block_size = config.block_size
        model_config, _ = load_model_config(config)
        self.max_model_len = _max_model_len(config, model_config.max_position_embeddings)
        loaded = load_model(
            config, self.device, self.max_model_len, tp_rank=tp_rank, tp_size=self.tp_size
        )
        self.model = loaded.model
        self.model_config = loaded.config
        self.compute_dtype = loaded.compute_dtype
        self.kv_cache_dtype = loaded.kv_cache_dtype or loaded.compute_dtype
        self.num_kv_heads = self.model.tp.num_kv_heads  # this rank's
        self.sampler = Sampler()
        self.rejection_sampler = RejectionSampler(self.sampler)
        self.max_blocks_per_req = -(-self.max_model_len // self.block_size)
        # The scheduler's step budget: the largest step the memory profile runs.
        self.max_num_batched_tokens = config.resolved_max_num_batched_tokens()
        cfg = self.model_config
        backend = choose_backend(
            attention_backend,
            self.device,
            self.compute_dtype,
            cfg.head_dim,
            cfg.hidden_size,
            self.model.tp.intermediate_size,
        )
        self.attn_backend = make_backend(
            backend, self.device, self.compute_dtype, self._staging_bytes()
        )
        self.model.set_attention_backend(self.attn_backend)
        self.cuda_graphs = self._make_graphs(graph_capture)
        # A drafted row's 1 + k queries as 1 + k single-query rows: a drafted decode step is
        # then a pure-decode step the graphs replay. Without graphs a drafted row stays one
        # multi-token row: one gather of its context per layer, where 1 + k decode rows
        # read it 1 + k times (slower on a CPU; see the README's speculative decoding notes).
        self.split_drafted_rows = self.cuda_graphs is not None
        self.kv_cache: torch.Tensor | None = None
        self.kv_prefault: KVPrefault | None = None  # the host cache's (new_kv_cache)
        self.num_blocks = self._num_blocks_for_memory()
        if self.tp_size > 1:
            # The scheduler hands every rank the same block ids: size for the smallest rank.
            self.num_blocks = distributed.all_reduce_min(self.num_blocks, self.device)
        self.kv_cache = self.new_kv_cache(self.num_blocks)
        # The step between execute_model and sample_tokens: (logits, states, drafts).
        self._pending: tuple[torch.Tensor, list, list[list[int]] | None] | None = None
        self.input_batch = InputBatch(
            config.max_num_seqs, self.max_model_len, self.max_blocks_per_req, self.num_blocks
        )

    def new_kv_cache(self, num_blocks: int) -> torch.Tensor:
        # One pool per layer: kv_cache[layer] = (K, V), each [blocks, block_size, kv_heads, head_dim].
        # Zeroed: padded reads must never see NaN garbage (0 attention weight * NaN = NaN).
        cfg = self.model_config
        shape = (cfg.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, cfg.head_dim)
        if self.device.type != "cpu":
            return torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
        # On the host, an anonymous mapping (on huge pages: kv_cache_buffer): the kernel hands
        # its pages out zeroed on first touch, so start-up does not write the whole pool
        # (seconds for a few GiB) before serving; a background thread then faults them in
        # ahead of the blocks the steps use (KVPrefault).
        nbytes = math.prod(shape) * self.kv_cache_dtype.itemsize
        buffer = kv_cache_buffer(nbytes)
        ahead = max(256, 4 * -(-self.max_num_batched_tokens // self.block_size))
        self.kv_prefault = KVPrefault(buffer, 2 * cfg.num_layers, num_blocks, ahead)
        return torch.from_numpy(buffer).view(self.kv_cache_dtype).view(shape)

    def _staging_bytes(self) -> int:
        """Room for a step's packed inputs at the budget (the cuda backend's staging buffer
        starts this large and grows past it)."""
        seqs, tokens = self.config.max_num_seqs, self.max_num_batched_tokens
        return 3 * 8 * tokens + seqs * (4 * self.max_blocks_per_req + 16) + 8 * 16

    def _make_graphs(self, capture: Capture | None) -> DecodeGraphs | None:
        if self.attn_backend.name != "cuda" or self.config.enforce_eager:
            return None
        if capture is None:
            # Graphs with collectives inside are not attempted: tensor parallel runs eagerly.
            if self.device.type != "cuda" or self.tp_size > 1:
                return None
            capture = CudaGraphCapture()
        return DecodeGraphs(
            lambda input_ids, meta: self.model(input_ids, meta, self.kv_cache),
            capture_sizes(self.config.max_num_seqs),
            self.max_blocks_per_req,
            self.max_model_len,
            self.device,
            capture,
        )

    def _num_blocks_for_memory(self) -> int:
        return dummy_runs.num_blocks_for_memory(self)

    def _profile_num_blocks(self, block_bytes: int) -> int:
        return dummy_runs.profile_num_blocks(self, block_bytes)

    def profile_run(self, query_lens: np.ndarray, block_table: np.ndarray) -> None:
        """The largest step's forward and sampler call (dummy_runs.profile_run)."""
        dummy_runs.profile_run(self, query_lens, block_table)

    def warmup(self) -> None:
        """A prefill, a mixed and a decode forward, then the CUDA graphs (dummy_runs.warmup)."""
        dummy_runs.warmup(self)

    def worker_model_config(self) -> WorkerModelConfig:
        """The model facts the EngineCore needs (vocabulary size, end-of-sequence ids)."""
        cfg = self.model_config
        return WorkerModelConfig(vocab_size=cfg.vocab_size, eos_token_ids=list(cfg.eos_token_ids))

    # ------------------------------------------------------------------------------ the step

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        """Apply the step's diffs, run the scheduled tokens and sample the caught-up requests.

        A step with structured rows (scheduler_output.structured_req_ids) stops before
        sampling and returns None: its grammar bitmask is filled while this forward runs, and
        sample_tokens finishes the step. Tensor-parallel ranks other than 0 return None (they
        run the forward, not the sampler).
        """
        self._update_states(scheduler_output)
        self._pending = None
        if not scheduler_output.num_scheduled_tokens:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        req_ids, sampled, step, draft_token_ids = self._prepare_inputs(scheduler_output)
        graphs = self.cuda_graphs
        if graphs is not None and graphs.can_run(step.meta):
            hidden = graphs.run(step.input_ids, step.meta)
        else:
            hidden = self.model(step.input_ids, step.meta, self.kv_cache)
        if not sampled:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        logits = self.model.compute_logits(hidden[step.logits_indices])
        if logits is None:
            return None
        states = [self.input_batch.requests[req_ids[i]] for i in sampled]
        self._pending = (logits, states, draft_token_ids)
        if scheduler_output.structured_req_ids:
            return None
        return self.sample_tokens(None)

    @torch.inference_mode()
    def sample_tokens(self, grammar_output: GrammarOutput | None) -> ModelRunnerOutput | None:
        """Sample the step execute_model ran, the grammar bitmask applied to its logits first."""
        if self._pending is None:  # a step that samples nothing, or a rank other than 0
            return (
                ModelRunnerOutput(req_ids=[], sampled_token_ids=[]) if self.tp_rank == 0 else None
            )
        (logits, states, draft_token_ids), self._pending = self._pending, None
        if grammar_output is not None:
            per_row = [s.req_id for s in states]
            if draft_token_ids is not None:  # a row per position: the drafts', then the bonus
                per_row = [
                    r for r, d in zip(per_row, draft_token_ids, strict=True) for _ in (*d, 0)
                ]
            apply_grammar_bitmask(logits, per_row, grammar_output)
        if draft_token_ids is not None:  # speculative decoding: verify the drafts
            return verify_drafts(
                self.rejection_sampler,
                logits,
                states,
                draft_token_ids,
                self.input_batch.sampling,
                self.model_config.vocab_size,
                self.device,
                self.model_config.eos_token_ids,
            )
        return sample_states(
            self.sampler,
            logits,
            states,
            self.input_batch.sampling,
            self.model_config.vocab_size,
            self.device,
            self.model_config.eos_token_ids,
        )

    def prepare_thread(self) -> None:
        """Ready the calling thread to run steps: its CUDA device, torch's thread team up."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.zeros(1 << 18, device=self.device).add_(1.0)

    def _update_states(self, so: SchedulerOutput) -> None:
        batch = self.input_batch
        for req_id in (*so.finished_req_ids, *so.preempted_req_ids):
            batch.remove_request(req_id)
        for new in so.scheduled_new_reqs:
            batch.add_request(new, self.device)
        for cached in so.scheduled_cached_reqs:
            batch.update_request(cached)

    def _prepare_inputs(
        self, so: SchedulerOutput
    ) -> tuple[list[str], list[int], StepInputs, list[list[int]] | None]:
        """Flatten the step into one token batch (vectorized): its requests in batch order,
        the indices of those sampled this step, the backend's device inputs, and the sampled
        requests' draft tokens (None: no drafts this step)."""
        batch = self.input_batch
        req_ids = list(so.num_scheduled_tokens)
        query_lens = np.fromiter(
            so.num_scheduled_tokens.values(), dtype=np.int64, count=len(req_ids)
        )
        rows = np.array([batch.requests[r].row for r in req_ids], dtype=np.int64)
        num_computed = batch.num_computed_tokens[rows]
        spec = so.scheduled_spec_decode_tokens
        split = bool(spec) and self.split_drafted_rows
        num_drafts = np.zeros(len(req_ids), dtype=np.int64)
        if spec:
            num_drafts = np.array([len(spec.get(r, ())) for r in req_ids], dtype=np.int64)
        # Single-query rows (and drafted ones when split, see below) first, by context
        # length: decode groups then pad little.
        single = query_lens - (num_drafts if split else 0) == 1
        order = np.lexsort((num_computed, ~single))
        req_ids = [req_ids[i] for i in order]
        rows, query_lens, num_computed = rows[order], query_lens[order], num_computed[order]
        num_drafts = num_drafts[order]
        num_tokens = batch.num_tokens[rows]
        if spec:  # drafts sit past a request's tokens for this step only
            for r, row, n in zip(req_ids, rows.tolist(), num_tokens.tolist(), strict=True):
                if r in spec:
                    batch.token_ids[row, n : n + len(spec[r])] = spec[r]
            num_tokens = num_tokens + num_drafts
        assert (num_computed + query_lens <= num_tokens).all(), "scheduled past a request's tokens"
        needed_blocks = -(-(num_computed + query_lens) // self.block_size)
        assert (needed_blocks <= batch.num_blocks_per_row[rows]).all(), (
            "a request is short of KV blocks"
        )
        positions = token_positions(query_lens, num_computed)
        input_ids = batch.token_ids[np.repeat(rows, query_lens), positions]
        block_tables = batch.block_table[rows, : int(needed_blocks.max())]
        if self.kv_prefault is not None:
            self.kv_prefault.advance(int(block_tables.max()))
        if split:
            # Query j of a drafted row attends as its own row, over the context up to itself.
            per_row = np.where(num_drafts > 0, query_lens, 1)
            row_of = np.repeat(np.arange(len(rows)), per_row)
            split_lens = np.where(num_drafts[row_of] > 0, 1, query_lens[row_of])
            first = np.cumsum(per_row) - per_row
            offset = np.arange(len(row_of)) - np.repeat(first, per_row)
            layout = step_layout(
                split_lens,
                num_computed[row_of] + offset,
                block_tables[row_of],
                self.block_size,
                positions,
            )
        else:
            layout = step_layout(query_lens, num_computed, block_tables, self.block_size, positions)
        sampled = np.flatnonzero(num_computed + query_lens == num_tokens)
        logits_indices = np.cumsum(query_lens)[sampled] - 1
        draft_token_ids = None
        if spec:
            # Logits at the last token and at every draft: len(drafts) + 1 rows a request.
            counts = num_drafts[sampled] + 1
            logits_indices = np.repeat(logits_indices - counts + 1, counts) + (
                np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            )
            draft_token_ids = [list(spec.get(req_ids[i], ())) for i in sampled.tolist()]
        return (
            req_ids,
            sampled.tolist(),
            self.attn_backend.prepare(input_ids, layout, logits_indices),
            draft_token_ids,
        )


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device.")
    return torch.device(device)


def _max_model_len(config: EngineConfig, model_context: int) -> int:
    if config.max_model_len is None:
        return min(model_context, _MAX_DEFAULT_MODEL_LEN)
    if config.max_model_len > model_context:
        raise ValueError(
            f"max_model_len={config.max_model_len} is longer than the model's context "
            f"({model_context} positions)."
        )
    return config.max_model_len
