"""Scheduler: decides each step which requests run and how many tokens each, under a token budget.

There is no prefill/decode split: a request has num_computed_tokens and gets tokens until it
catches up with its prompt plus outputs. Running requests go first, in order; waiting ones are
admitted after them in arrival order, each skipping its longest cached prefix, a long prompt
taking as many steps as the budget needs (chunked prefill). When the KV cache runs out, the
running request at the tail is preempted by recompute.

num_computed_tokens advances in update_from_output, once the step has run, so a step's
SchedulerOutput carries the values from before it; only a prefix-cache hit counts as
computed at once, when its request is admitted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from engine_core.config import EngineConfig
from engine_core.protocol import (
    CachedRequestData,
    EngineCoreOutput,
    FinishReason,
    GrammarOutput,
    Logprobs,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    SchedulerStats,
)
from engine_core.sched.kv_cache_manager import KVCacheManager
from engine_core.sched.request import Request, RequestStatus
from engine_core.spec_decode.scheduling import SpecDecodeScheduling
from engine_core.structured_output.manager import StructuredOutputManager


class Scheduler:
    """Continuous batching with chunked prefill, prefix caching and preemption by recompute."""

    def __init__(self, config: EngineConfig, num_blocks: int, max_model_len: int) -> None:
        if max_model_len < 2:
            raise ValueError(
                f"max_model_len must be at least 2 (a prompt token and an output), got {max_model_len}."
            )
        self.config = config
        self.max_model_len = max_model_len
        self.block_size = config.block_size
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.resolved_max_num_batched_tokens()
        self.long_prefill_token_threshold = config.long_prefill_token_threshold
        self.enable_prefix_caching = config.enable_prefix_caching
        self.kv_cache_manager = KVCacheManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Finished or aborted, and preempted, since the last SchedulerOutput: the runner drops them.
        self.finished_req_ids: set[str] = set()
        self.preempted_req_ids: set[str] = set()
        # Requests the scheduler itself failed: reported by the next update_from_output.
        self._error_outputs: list[EngineCoreOutput] = []
        self._prefix_cache_queries = 0
        self._prefix_cache_hits = 0
        self._num_preemptions = 0
        # Set by the EngineCore (it knows the vocabulary): compiles grammars, fills bitmasks.
        self.structured_output: StructuredOutputManager | None = None
        self.spec = SpecDecodeScheduling(self.kv_cache_manager, max_model_len)

    # ---------------------------------------------------------------- requests in and out

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def add_request(self, request: Request) -> None:
        """Queue a request at the tail of the waiting queue."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the scheduler.")
        assert request.block_size == self.block_size, f"block_size {request.block_size}"
        if request.num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"request {request.request_id!r}: the prompt has {request.num_prompt_tokens} "
                f"tokens, but max_model_len is {self.max_model_len} and the prompt must leave "
                "room for at least one output token."
            )
        if request.sampling_params.structured_outputs is not None:
            if self.structured_output is None:
                raise ValueError("this engine has no structured outputs (no grammar compiler).")
            self.structured_output.attach(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(
        self, request_ids: Iterable[str], reason: FinishReason = FinishReason.ABORT
    ) -> list[str]:
        """Finish requests from outside (abort); unknown or finished ids are ignored."""
        finished = []
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.finish(reason)
            self._free_request(request)
            finished.append(req_id)
        return finished

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting or self._error_outputs)

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    def make_stats(self, reset: bool = True) -> SchedulerStats:
        """Queue sizes and KV usage now; prefix-cache and preemption counts since the last call.

        reset=False peeks: the counters stay for the next step's report.
        """
        kv = self.kv_cache_manager
        stats = SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=kv.usage,
            prefix_cache_queries=self._prefix_cache_queries,
            prefix_cache_hits=self._prefix_cache_hits,
            num_preemptions=self._num_preemptions,
            num_free_blocks=kv.num_free_blocks,
            num_usable_blocks=kv.num_usable_blocks,
        )
        self.spec.counter.fill(stats, reset)
        if reset:
            self._prefix_cache_queries = self._prefix_cache_hits = self._num_preemptions = 0
        return stats

    # ---------------------------------------------------------------- one step

    def schedule(self) -> SchedulerOutput:
        """Decide this step: running requests first, then waiting ones, under the token budget."""
        budget = self.max_num_batched_tokens
        threshold = self.long_prefill_token_threshold
        kv = self.kv_cache_manager
        num_scheduled: dict[str, int] = {}
        cached_reqs: list[CachedRequestData] = []
        new_reqs: list[NewRequestData] = []
        # Admitting while preempting would only trade one request's blocks for another's.
        num_preemptions_before = self._num_preemptions
        spec_tokens: dict[str, list[int]] = {}

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = len(request.all_token_ids) - request.num_computed_tokens
            if threshold > 0:
                num_new = min(num_new, threshold)
            num_new = min(num_new, budget)
            if num_new <= 0:  # waiting for a sampled token the runner did not return
                i += 1
                continue
            new_block_ids, drafts = self.spec.allocate(request, num_new, budget)
            if new_block_ids is None:
                new_block_ids = self._preempt_until_allocated(request, num_new)
            if new_block_ids is None:
                if request.is_finished:
                    continue  # failed and left running: index i is now the next request
                break  # preempted itself, as the tail: nothing left behind it
            cached_reqs.append(
                CachedRequestData(
                    req_id=request.request_id,
                    new_token_ids=request.all_token_ids[request.num_synced_tokens :],
                    new_block_ids=new_block_ids,
                    num_computed_tokens=request.num_computed_tokens,
                    num_dropped_blocks=kv.take_num_dropped_blocks(request.request_id),
                )
            )
            request.num_synced_tokens = request.num_tokens
            if drafts:
                spec_tokens[request.request_id] = drafts
                num_new += len(drafts)
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            i += 1

        # Strict FCFS: a waiting request that does not fit blocks those behind it (one whose
        # grammar still compiles steps aside: it keeps its place for the next step).
        compiling: list[Request] = []
        while (
            self._num_preemptions == num_preemptions_before
            and self.waiting
            and budget > 0
            and len(self.running) < self.max_num_seqs
        ):
            request = self.waiting[0]
            grammar = request.grammar
            if grammar is not None and not grammar.ready():
                self.waiting.popleft()
                if grammar.failed:  # it did not compile (in time): the request fails alone
                    self._fail(request, f"request {request.request_id!r}: {grammar.error}")
                else:
                    compiling.append(request)
                continue
            if not kv.can_ever_fit(request.num_tokens):
                self.waiting.popleft()
                self._fail_too_big(request)
                continue
            computed_blocks, num_hit = kv.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit
            if threshold > 0:
                num_new = min(num_new, threshold)
            num_new = min(num_new, budget)
            if kv.allocate_slots(request, num_new, computed_blocks) is None:
                break
            self.waiting.popleft()
            if self.enable_prefix_caching:
                self._prefix_cache_queries += request.num_tokens
                self._prefix_cache_hits += num_hit
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit
            self.running.append(request)
            new_reqs.append(
                NewRequestData(
                    req_id=request.request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    output_token_ids=list(request.output_token_ids),
                    sampling_params=request.sampling_params,
                    block_ids=kv.get_block_ids(request.request_id),
                    num_computed_tokens=num_hit,
                )
            )
            request.num_synced_tokens = request.num_tokens
            num_scheduled[request.request_id] = num_new
            budget -= num_new

        self.waiting.extendleft(reversed(compiling))
        total = self.max_num_batched_tokens - budget
        output = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=total,
            finished_req_ids=sorted(self.finished_req_ids),
            preempted_req_ids=sorted(self.preempted_req_ids),
            scheduled_spec_decode_tokens=spec_tokens,
        )
        # An empty step may never reach the runner: keep its drop lists for the next one.
        if total > 0:
            self.finished_req_ids = set()
            self.preempted_req_ids = set()
        if self.structured_output is not None:
            output.structured_req_ids = self.structured_output.masked_req_ids(
                self.requests, num_scheduled
            )
            if compiling and total == 0:  # nothing to run: wait a little for a compile
                self.structured_output.wait_for_compiles(compiling, 0.01)
        return output

    def get_grammar_bitmask(self, scheduler_output: SchedulerOutput) -> GrammarOutput | None:
        """The step's grammar bitmask (None: no structured rows); called while the model runs."""
        if self.structured_output is None:
            return None
        return self.structured_output.grammar_bitmask(self.requests, scheduler_output)

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput | None
    ) -> list[EngineCoreOutput]:
        """Advance the scheduled requests, append their sampled tokens and finish the done ones."""
        outputs, self._error_outputs = self._error_outputs, []
        sampled: dict[str, int] = {}
        logprobs_of: dict[str, Logprobs | None] = {}
        if runner_output is not None:
            sampled = dict(zip(runner_output.req_ids, runner_output.sampled_token_ids, strict=True))
            if runner_output.logprobs is not None:
                logprobs_of = dict(zip(runner_output.req_ids, runner_output.logprobs, strict=True))
        spec = scheduler_output.scheduled_spec_decode_tokens
        emitted_of = self.spec.emitted(scheduler_output, runner_output)
        any_finished = False
        for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted since it was scheduled
            request.num_computed_tokens += num_tokens
            token = sampled.get(req_id)
            # A partial prefill samples nothing worth keeping.
            if token is None or request.num_computed_tokens < request.num_tokens:
                continue
            if req_id in spec:
                emitted = emitted_of.get(req_id) or ([token], None)
                tokens, lps = self.spec.settle(request, spec[req_id], emitted)
                new_tokens, new_lps = self._append_until_stop(request, tokens, lps)
            else:
                request.append_output_token(token)
                self._check_stop(request, token)
                lp = logprobs_of.get(req_id)
                new_tokens, new_lps = [token], [lp] if lp is not None else None
            if request.grammar is not None and not request.is_finished:
                request.grammar.advance(request, new_tokens)
            outputs.append(
                EngineCoreOutput(
                    request_id=req_id,
                    new_token_ids=new_tokens,
                    new_logprobs=new_lps,
                    finish_reason=request.finish_reason,
                    stop_reason=request.stop_reason,
                    num_cached_tokens=request.num_cached_tokens,
                    error=request.error,
                )
            )
            if request.is_finished:
                any_finished = True
                self._free_request(request)
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        return outputs

    # ---------------------------------------------------------------- helpers

    def _append_until_stop(
        self, request: Request, tokens: list[int], lps: list[Logprobs] | None
    ) -> tuple[list[int], list[Logprobs] | None]:
        """Append a verified run of tokens; a stop inside it ends the request there."""
        kept = 0
        for token in tokens:
            kept += 1
            request.append_output_token(token)
            self._check_stop(request, token)
            if request.is_finished:
                break
        return tokens[:kept], lps[:kept] if lps is not None else None

    def _check_stop(self, request: Request, token: int) -> None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token in request.stop_token_ids:
                request.finish(FinishReason.STOP, stop_reason=token)
                return
            if not params.ignore_eos and token in request.eos_token_ids:
                request.finish(FinishReason.STOP)
                return
        if (
            params.max_tokens is not None and request.num_output_tokens >= params.max_tokens
        ) or request.num_tokens >= self.max_model_len:
            request.finish(FinishReason.LENGTH)

    def _preempt_until_allocated(self, request: Request, num_new: int) -> list[int] | None:
        """Preempt from the tail of running until a running request's allocation fits.

        None when the request itself was preempted, or failed because even the whole pool
        could not hold it (then nothing is preempted for it). Otherwise the loop ends: once
        alone in running, the request has every block that is not its own.
        """
        kv = self.kv_cache_manager
        if not kv.can_ever_fit(request.num_computed_tokens + num_new):
            self._fail_too_big(request)
            return None
        while True:
            victim = self.running.pop()
            self._preempt(victim)
            if victim is request:
                return None
            new_block_ids = kv.allocate_slots(request, num_new)
            if new_block_ids is not None:
                return new_block_ids

    def _preempt(self, request: Request) -> None:
        """Free a running request's KV cache; it recomputes from the head of the waiting queue."""
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.spec_token_ids = []
        self._num_preemptions += 1
        self.preempted_req_ids.add(request.request_id)
        self.waiting.appendleft(request)

    def _fail_too_big(self, request: Request) -> None:
        """Finish a request that the whole KV cache cannot hold (instead of preempting forever)."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        kv = self.kv_cache_manager
        self._fail(
            request,
            f"request {request.request_id!r} needs more than the whole KV cache: "
            f"{request.num_tokens} tokens take more than {kv.num_usable_blocks} "
            f"blocks of {self.block_size}.",
        )

    def _fail(self, request: Request, error: str) -> None:
        """Finish `request` alone with an error its client sees; its blocks go back."""
        request.error = error
        request.finish(FinishReason.ERROR)
        self._free_request(request)
        self._error_outputs.append(
            EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=[],
                finish_reason=FinishReason.ERROR,
                num_cached_tokens=request.num_cached_tokens,
                error=request.error,
            )
        )

    def _free_request(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        self.requests.pop(request.request_id, None)
        self.finished_req_ids.add(request.request_id)
