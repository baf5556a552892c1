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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine_core import distributed
from engine_core.attention import AttentionMetadata, token_positions
from engine_core.config import EngineConfig
from engine_core.input_batch import InputBatch
from engine_core.model_loader import load_model, load_model_config
from engine_core.protocol import ModelRunnerOutput, SamplingParams, SchedulerOutput
from engine_core.sampler import Sampler, SamplingMetadata

_MAX_DEFAULT_MODEL_LEN = 8192


@dataclass(slots=True)
class StepInputs:
    """One step flattened into a token batch: single-query rows first, by context length."""

    req_ids: list[str]  # in token-batch order
    input_ids: torch.Tensor  # [T] long
    meta: AttentionMetadata
    sampled: list[int]  # indices into req_ids of the requests sampled this step
    logits_indices: torch.Tensor  # [len(sampled)]: their last token in the batch


class ModelRunner:
    """Owns the model, its KV cache and the persistent batch; `execute_model` is one step.

    tp_rank: this process's rank when config.tensor_parallel_size > 1 (the process must be in
    the engine's process group); device: where it runs, by default from config.device.
    """

    def __init__(
        self, config: EngineConfig, tp_rank: int = 0, device: torch.device | None = None
    ) -> None:
        self.config = config
        self.tp_rank, self.tp_size = tp_rank, config.tensor_parallel_size
        if self.tp_size > 1:
            distributed.require_group(self.tp_size)
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = device if device is not None else _resolve_device(config.device)
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
        self.num_kv_heads = self.model.tp.num_kv_heads  # this rank's
        self.num_blocks = self._num_kv_blocks()
        if self.tp_size > 1:
            # The scheduler hands every rank the same block ids: size for the smallest rank.
            self.num_blocks = distributed.all_reduce_min(self.num_blocks, self.device)
        cfg = self.model_config
        # One pool per layer: kv_cache[layer] = (K, V), each [blocks, block_size, kv_heads, head_dim].
        # Zeroed: padded reads must never see NaN garbage (0 attention weight * NaN = NaN).
        self.kv_cache = torch.zeros(
            (cfg.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, cfg.head_dim),
            dtype=self.compute_dtype,
            device=self.device,
        )
        max_blocks_per_req = -(-self.max_model_len // self.block_size)
        self.input_batch = InputBatch(
            config.max_num_seqs, self.max_model_len, max_blocks_per_req, self.num_blocks
        )
        self.sampler = Sampler()

    def _num_kv_blocks(self) -> int:
        cfg = self.model_config
        elem = torch.tensor([], dtype=self.compute_dtype).element_size()
        block_bytes = 2 * cfg.num_layers * self.block_size * self.num_kv_heads * cfg.head_dim * elem
        if self.config.num_gpu_blocks_override is not None:
            return self.config.num_gpu_blocks_override
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * self.config.gpu_memory_utilization - (total - free)
        else:
            budget = self.config.kv_cache_space_gib * 2**30
        num_blocks = int(budget // block_bytes)
        if num_blocks < 2:
            raise ValueError(
                f"the KV cache budget ({budget / 2**30:.3f} GiB) holds {num_blocks} blocks of "
                f"{block_bytes} bytes; at least 2 are needed (raise kv_cache_space_gib or "
                f"gpu_memory_utilization)."
            )
        return num_blocks

    # ------------------------------------------------------------------------------ the step

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        """Apply the step's diffs, run the scheduled tokens and sample the caught-up requests.

        Tensor-parallel ranks other than 0 return None (they run the forward, not the sampler).
        """
        self._update_states(scheduler_output)
        if not scheduler_output.num_scheduled_tokens:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        step = self._prepare_inputs(scheduler_output)
        hidden = self.model(step.input_ids, step.meta, self.kv_cache)
        if not step.sampled:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        logits = self.model.compute_logits(hidden[step.logits_indices])
        if logits is None:
            return None
        states = [self.input_batch.requests[step.req_ids[i]] for i in step.sampled]
        metadata = SamplingMetadata.build(
            [s.sampling_params for s in states],
            [s.prompt_token_ids for s in states],
            [s.output_token_ids for s in states],
            [s.generator for s in states],
            self.model_config.vocab_size,
            self.device,
            eos_token_ids=self.model_config.eos_token_ids,
        )
        out = self.sampler(logits, metadata)
        logprobs = out.logprobs if any(lp is not None for lp in out.logprobs) else None
        return ModelRunnerOutput(
            req_ids=[s.req_id for s in states],
            sampled_token_ids=out.token_ids.tolist(),
            logprobs=logprobs,
        )

    def _update_states(self, so: SchedulerOutput) -> None:
        batch = self.input_batch
        for req_id in so.finished_req_ids:
            batch.remove_request(req_id)
        for new in so.scheduled_new_reqs:
            batch.add_request(new, self.device)
        for cached in so.scheduled_cached_reqs:
            batch.update_request(cached)

    def _prepare_inputs(self, so: SchedulerOutput) -> StepInputs:
        """Flatten the step into one token batch with its attention metadata (vectorized)."""
        batch = self.input_batch
        req_ids = list(so.num_scheduled_tokens)
        if sum(so.num_scheduled_tokens.values()) != so.total_num_scheduled_tokens:
            raise ValueError(
                f"total_num_scheduled_tokens={so.total_num_scheduled_tokens} is not the sum of "
                f"num_scheduled_tokens ({sum(so.num_scheduled_tokens.values())})."
            )
        missing = [r for r in req_ids if r not in batch]
        if missing:
            raise ValueError(f"scheduled request {missing[0]!r} is not in the batch.")
        query_lens = np.fromiter(
            so.num_scheduled_tokens.values(), dtype=np.int64, count=len(req_ids)
        )
        if (query_lens < 1).any():
            bad = req_ids[int(np.argmax(query_lens < 1))]
            raise ValueError(
                f"request {bad!r} is scheduled for {so.num_scheduled_tokens[bad]} tokens."
            )
        rows = np.array([batch.requests[r].row for r in req_ids], dtype=np.int64)
        num_computed = batch.num_computed_tokens[rows]
        # Single-query rows first, by context length: decode groups then pad little.
        order = np.lexsort((num_computed, query_lens > 1))
        req_ids = [req_ids[i] for i in order]
        rows, query_lens, num_computed = rows[order], query_lens[order], num_computed[order]
        num_tokens = batch.num_tokens[rows]
        over = num_computed + query_lens > num_tokens
        if over.any():
            i = int(np.argmax(over))
            raise ValueError(
                f"request {req_ids[i]!r}: {int(num_computed[i])} computed + {int(query_lens[i])} "
                f"scheduled tokens exceed its {int(num_tokens[i])} tokens."
            )
        positions = token_positions(query_lens, num_computed)
        input_ids = batch.token_ids[np.repeat(rows, query_lens), positions]
        needed_blocks = -(-(num_computed + query_lens) // self.block_size)
        short = needed_blocks > batch.num_blocks[rows]
        if short.any():
            i = int(np.argmax(short))
            raise ValueError(
                f"request {req_ids[i]!r} needs {int(needed_blocks[i])} KV blocks but has "
                f"{int(batch.num_blocks[rows[i]])}."
            )
        block_tables = batch.block_table[rows, : int(needed_blocks.max())]
        meta = AttentionMetadata.build(
            query_lens,
            num_computed,
            block_tables,
            self.block_size,
            self.device,
            self.compute_dtype,
            positions=positions,
        )
        sampled = np.flatnonzero(num_computed + query_lens == num_tokens)
        return StepInputs(
            req_ids=req_ids,
            input_ids=torch.from_numpy(input_ids).to(self.device),
            meta=meta,
            sampled=sampled.tolist(),
            logits_indices=torch.from_numpy(np.cumsum(query_lens)[sampled] - 1).to(self.device),
        )

    # ------------------------------------------------------------------------------ warm-up

    @torch.inference_mode()
    def warmup(self) -> None:
        """Run a prefill, a mixed and a decode forward once so the first request is not slow.

        It writes into the first blocks of the KV cache, which hold no request yet.
        """
        n = min(2 * self.block_size, self.max_model_len, self.num_blocks * self.block_size) - 1
        if n < 1:
            return
        table = np.arange(-(-(n + 1) // self.block_size), dtype=np.int64)[None, :].repeat(2, 0)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        for query_lens, computed in (([n], [0]), ([1, n - 1], [n, 1]), ([1], [n])):
            meta = AttentionMetadata.build(
                np.array(query_lens),
                np.array(computed),
                table,
                self.block_size,
                self.device,
                self.compute_dtype,
            )
            hidden = self.model(ids[: sum(query_lens)], meta, self.kv_cache)
            logits = self.model.compute_logits(hidden[-1:])
            if logits is None:  # a tensor-parallel rank other than 0: no sampling
                continue
            md = SamplingMetadata.build(
                [SamplingParams(temperature=0.0)],
                [[0]],
                [[]],
                [None],
                self.model_config.vocab_size,
                self.device,
            )
            self.sampler(logits, md)
        self.kv_cache[:, :, : table.shape[1]].zero_()


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
