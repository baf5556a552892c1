"""Request: the scheduler's state of one sequence (tokens, progress, block hashes, finish)."""

from __future__ import annotations

import enum

from engine_core.protocol import FinishReason, SamplingParams
from engine_core.sched.block_pool import BlockHash, hash_block_tokens
from engine_core.structured_output.manager import GrammarState


class RequestStatus(enum.IntEnum):
    WAITING = 0  # never scheduled yet
    RUNNING = 1
    PREEMPTED = 2  # back in the waiting queue, its KV cache freed
    FINISHED = 3  # see Request.finish_reason


class Request:
    """One sequence: its prompt, its outputs so far and how much of it the KV cache holds."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: list[int],
        arrival_time: float,
        block_size: int,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: the prompt must have at least one token.")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}.")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.stop_token_ids = frozenset(sampling_params.stop_token_ids or ())
        self.arrival_time = arrival_time
        self.block_size = block_size

        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        # Tokens whose K/V is in the cache (or is being written by the step just scheduled).
        self.num_computed_tokens = 0
        # Prefix-cache hit (tokens) at the first schedule; reported with every output.
        self.num_cached_tokens = 0
        # How many of all_token_ids the model runner holds: the rest travel as new_token_ids.
        self.num_synced_tokens = 0
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | None = None
        self.error: str | None = None
        # Structured outputs: its grammar's compile and matcher (set by the scheduler).
        self.grammar: GrammarState | None = None
        # One chained hash per full block of all_token_ids, grown as blocks fill.
        self.block_hashes: list[BlockHash] = []
        self._update_block_hashes()
        # Speculative decoding: drafts for the next step (set by the proposer after a step).
        self.spec_token_ids: list[int] = []
        # Its drafts' running acceptance (decayed counts; see spec_decode/stats.py).
        self.spec_accepted = 0.0
        self.spec_trials = 0.0
        # Its last verification, (drafts verified, accepted), until the drafter reads it.
        self.spec_last_outcome: tuple[int, int] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_output_token(self, token_id: int) -> None:
        """Record one sampled token (hashing the block it completes, if any)."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if len(self.all_token_ids) % self.block_size == 0:
            self._update_block_hashes()

    def finish(self, reason: FinishReason, stop_reason: int | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def _update_block_hashes(self) -> None:
        # Incremental: only the blocks that filled since the last call are hashed.
        bs = self.block_size
        start = len(self.block_hashes)
        parent = self.block_hashes[-1] if self.block_hashes else None
        for i in range(start, len(self.all_token_ids) // bs):
            parent = hash_block_tokens(parent, self.all_token_ids[i * bs : (i + 1) * bs])
            self.block_hashes.append(parent)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, outputs={self.num_output_tokens})"
        )
