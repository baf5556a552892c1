"""The scheduler's side of speculative decoding: which drafts a step verifies, and what the
verification leaves of them.

Torch-free (the scheduler side imports it). A running request that is decoding carries the
drafts the Drafter proposed after the last step; the scheduler asks `allocate` for its
blocks, drafts included when they fit (drafts never preempt anyone), and after the step
`settle` rolls the rejected drafts back: num_computed_tokens, and the trailing blocks that
hold only rejected slots, which go back to the pool at once.
"""

from __future__ import annotations

from engine_core.protocol import Logprobs, ModelRunnerOutput, SchedulerOutput
from engine_core.sched.kv_cache_manager import KVCacheManager
from engine_core.sched.request import Request
from engine_core.spec_decode.stats import SpecDecodingCounter

Emitted = tuple[list[int], list[Logprobs] | None]


class SpecDecodeScheduling:
    """Drafts in and out of a step's schedule, and the acceptance counts of what was verified."""

    def __init__(self, kv_cache_manager: KVCacheManager, max_model_len: int) -> None:
        self.kv = kv_cache_manager
        self.max_model_len = max_model_len
        self.counter = SpecDecodingCounter()
        # Whether the last step only decoded (each request one token and its drafts): the
        # steps the off-switch's cost model learns from (switch.py).
        self.last_step_decoded = False

    def allocate(
        self, request: Request, num_new: int, budget: int
    ) -> tuple[list[int] | None, list[int]]:
        """Blocks for a running request's num_new tokens and as many of its drafts as fit:
        (new block ids, or None if even the tokens alone do not fit; the drafts scheduled).

        The request's drafts are consumed: a step verifies them now or never.
        """
        drafts, request.spec_token_ids = request.spec_token_ids, []
        k = self._num_drafts(request, len(drafts), num_new, budget)
        if k:
            new_block_ids = self.kv.allocate_slots(request, num_new, num_lookahead_tokens=k)
            if new_block_ids is not None:
                return new_block_ids, drafts[:k]
        return self.kv.allocate_slots(request, num_new), []

    def _num_drafts(self, request: Request, num_proposed: int, num_new: int, budget: int) -> int:
        """How many drafts this step can verify: 0 unless the request is decoding (one token
        to compute), then capped by the step's budget, the context and max_tokens (a step
        emits at most drafts + 1 tokens)."""
        if (
            not num_proposed
            or num_new != 1
            or request.num_tokens - request.num_computed_tokens != 1
        ):
            return 0
        k = min(num_proposed, budget - 1, self.max_model_len - request.num_tokens)
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            k = min(k, max_tokens - request.num_output_tokens - 1)
        return max(k, 0)

    def emitted(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput | None
    ) -> dict[str, Emitted]:
        """Per drafted request of the step: the tokens the runner emitted (and their logprobs)."""
        spec = scheduler_output.scheduled_spec_decode_tokens
        self.last_step_decoded = not scheduler_output.scheduled_new_reqs and all(
            n == 1 + len(spec.get(r, ())) for r, n in scheduler_output.num_scheduled_tokens.items()
        )
        out = runner_output
        if not spec or out is None or out.emitted_token_ids is None:
            return {}
        lps = out.emitted_logprobs or [None] * len(out.req_ids)
        return {
            r: (t, lp) for r, t, lp in zip(out.req_ids, out.emitted_token_ids, lps, strict=True)
        }

    def settle(self, request: Request, drafts: list[int], emitted: Emitted) -> Emitted:
        """Count a verification and roll its rejected drafts back; returns the emitted tokens.

        The request's num_computed_tokens already counts every draft as computed. A rejected
        draft's K/V slot is past the new num_computed_tokens (rewritten, never cached), and a
        block holding only such slots goes back to the pool now rather than when the
        request ends.
        """
        tokens, lps = emitted
        num_accepted = max(len(tokens) - 1, 0)
        self.counter.observe(request, len(drafts), num_accepted)
        num_rejected = len(drafts) - num_accepted
        if num_rejected > 0:
            request.num_computed_tokens -= num_rejected
            self.kv.free_past_computed(request)
        return tokens, lps
