"""The frontend's view of running requests: EngineCore outputs in, user RequestOutputs out.

Per step it detokenizes each sample's new tokens, applies stop strings (which the core does
not know about: a hit is returned in `reqs_to_abort`), converts logprobs, aggregates the n
samples of a request, and records the timings the server's metrics need.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine_core.protocol import (
    EngineCoreOutput,
    EngineCoreRequest,
    FinishReason,
    Logprobs,
    SamplingParams,
)
from frontend.detokenizer import make_decode
from frontend.outputs import (
    FinishedRequestStats,
    IterationStats,
    Logprob,
    RequestOutput,
    RequestOutputKind,
)
from frontend.request_state import RequestState, SampleState, child_params

_FINISH_REASON = {reason: str(reason) for reason in FinishReason}
_STOP = FinishReason.STOP


@dataclass(slots=True)
class ProcessedOutputs:
    """What one process_outputs() call produced."""

    request_outputs: list[RequestOutput] = field(default_factory=list)
    reqs_to_abort: list[str] = field(default_factory=list)  # engine ids a stop string ended
    iteration_stats: IterationStats = field(default_factory=IterationStats)


class OutputProcessor:
    """Tracks the frontend's running requests and turns engine outputs into RequestOutputs."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._decode_token = make_decode(tokenizer, skip_special_tokens=False)
        self._token_text: dict[int, str] = {}
        self._requests: dict[str, RequestState] = {}
        self._samples: dict[str, SampleState] = {}  # by engine id
        self._aborted_stats: list[FinishedRequestStats] = []  # reported by the next step
        # Totals since start, for the server's counters.
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        output_kind: RequestOutputKind,
        queue: object | None = None,
    ) -> list[EngineCoreRequest]:
        """Start tracking a request; returns the engine requests to send (n of them)."""
        _validate_request(request_id, prompt_token_ids, params, output_kind, queue)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        n = params.n
        engine_ids = [request_id] if n == 1 else [f"{i}_{request_id}" for i in range(n)]
        for engine_id in engine_ids:
            if engine_id in self._samples:
                raise ValueError(
                    f"request {request_id!r} needs engine request id {engine_id!r}, which "
                    "another running request already uses"
                )
        request = RequestState(
            request_id, prompt, prompt_token_ids, output_kind, queue, arrival_time
        )
        core_requests = []
        for i, engine_id in enumerate(engine_ids):
            child = params if n == 1 else child_params(params, i)
            sample = SampleState(request, i, engine_id, child, self.tokenizer)
            request.samples.append(sample)
            self._samples[engine_id] = sample
            core_requests.append(
                EngineCoreRequest(engine_id, prompt_token_ids, child, arrival_time)
            )
        request.num_unfinished = n
        self._requests[request_id] = request
        return core_requests

    def process_outputs(
        self, engine_core_outputs: list[EngineCoreOutput], timestamp: float
    ) -> ProcessedOutputs:
        """Apply one engine step's outputs; return the user outputs and what to abort."""
        result = ProcessedOutputs()
        stats = result.iteration_stats
        if self._aborted_stats:
            stats.finished_requests.extend(self._aborted_stats)
            self._aborted_stats.clear()
        changed: dict[str, list[SampleState]] = {}
        for out in engine_core_outputs:
            sample = self._samples.get(out.request_id)
            if sample is None or sample.finish_reason is not None:
                continue  # aborted or stopped here while the engine was still stepping it
            if self._update(sample, out, timestamp, stats):
                result.reqs_to_abort.append(sample.engine_id)
            if not sample.changed:
                sample.changed = True
                changed.setdefault(sample.request.request_id, []).append(sample)
        for samples in changed.values():
            request = samples[0].request
            for s in samples:
                s.changed = False
            if request.num_unfinished == 0:
                request.metrics.finished_time = timestamp
            self._emit(request, request.make_output(samples), result.request_outputs)
        self.num_prompt_tokens_total += stats.num_prompt_tokens
        self.num_generation_tokens_total += stats.num_generation_tokens
        return result

    def abort_requests(self, request_ids: list[str]) -> list[str]:
        """Abort user requests (unknown or finished ones are skipped); returns the engine ids
        to abort in the core. A request with a queue gets a final output, finish_reason "abort"."""
        engine_ids: list[str] = []
        now = time.monotonic()
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is None:
                continue
            unfinished = self._finish_all(request, "abort", now)
            engine_ids.extend(s.engine_id for s in unfinished)
            self._aborted_stats.extend(s.finished_stats(now) for s in unfinished)
            if request.queue is not None:
                request.queue.put_nowait(request.make_output(unfinished))
        return engine_ids

    def fail_all(self, error: str) -> list[RequestOutput]:
        """The engine died: finish every request with finish_reason "error" and `error`."""
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        for request in list(self._requests.values()):
            request.error = error
            unfinished = self._finish_all(request, "error", now)
            self._emit(request, request.make_output(unfinished), outputs)
        return outputs

    # ------------------------------------------------------------------ internals

    def _update(
        self, s: SampleState, out: EngineCoreOutput, now: float, stats: IterationStats
    ) -> bool:
        """Apply one engine output to its sample; True when a stop string ended it here."""
        new_ids = out.new_token_ids
        request = s.request
        if out.num_cached_tokens:
            request.num_cached_tokens = max(request.num_cached_tokens, out.num_cached_tokens)
        if new_ids:
            self._record_timing(s, now, len(new_ids), stats)
        # EOS or a stop token: in token_ids, but its text only if the user asked for it.
        num_text = len(new_ids)
        if out.finish_reason == _STOP and new_ids and not s.params.include_stop_str_in_output:
            num_text -= 1
        base = len(s.token_ids)
        keep = len(new_ids)  # tokens up to the one that completed a stop string
        stopped = False
        if s.stop:
            # Token by token, so that a stop string cuts token_ids right after its last token.
            for i in range(num_text):
                if s.append_text(s.detokenizer.add_tokens(new_ids[i : i + 1]), base + i + 1):
                    keep, stopped = i + 1, True
                    break
        else:
            s.text += s.detokenizer.add_tokens(new_ids if num_text == keep else new_ids[:num_text])
        if out.finished and not stopped:
            stopped = s.append_text(s.detokenizer.flush(), base + keep)
        s.token_ids.extend(new_ids if keep == len(new_ids) else new_ids[:keep])
        if s.logprobs is not None and out.new_logprobs:
            for lps in out.new_logprobs[:keep]:
                s.logprobs.append(self._convert_logprobs(lps))
                s.cumulative_logprob = (s.cumulative_logprob or 0.0) + lps.logprobs[0]
        if out.error is not None:
            request.error = out.error
        if not stopped and out.finish_reason is not None:
            s.finish_reason, s.stop_reason = _FINISH_REASON[out.finish_reason], out.stop_reason
        if s.finish_reason is not None:
            request.num_unfinished -= 1
            stats.finished_requests.append(s.finished_stats(now))
        return stopped and not out.finished

    def _record_timing(
        self, s: SampleState, now: float, num_new: int, stats: IterationStats
    ) -> None:
        metrics = s.request.metrics
        if s.first_token_time is None:
            s.first_token_time = now
            stats.time_to_first_tokens.append(now - metrics.arrival_time)
            stats.num_prompt_tokens += len(s.request.prompt_token_ids)
            if metrics.first_token_time is None:
                metrics.first_token_time = now
        elif s.last_token_time is not None:
            stats.inter_token_latencies.append(now - s.last_token_time)
        s.last_token_time = metrics.last_token_time = now
        metrics.num_generation_tokens += num_new
        stats.num_generation_tokens += num_new

    def _convert_logprobs(self, lps: Logprobs) -> dict[int, Logprob]:
        # Sampled token first, then the top-k by rank; a sampled token that is also in the
        # top-k keeps its first place in the dict.
        ranks = [lps.sampled_rank or None, *range(1, len(lps.token_ids))]
        return {
            tid: Logprob(lp, rank, self._token_string(tid))
            for tid, lp, rank in zip(lps.token_ids, lps.logprobs, ranks, strict=True)
        }

    def _token_string(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self._decode_token([token_id])
        return text

    def _finish_all(self, request: RequestState, reason: str, now: float) -> list[SampleState]:
        """Finish the request's unfinished samples with `reason` and forget the request."""
        unfinished = [s for s in request.samples if s.finish_reason is None]
        for s in unfinished:
            s.finish_reason = reason
        request.num_unfinished = 0
        request.metrics.finished_time = now
        self._forget(request)
        return unfinished

    def _emit(
        self, request: RequestState, output: RequestOutput | None, into: list[RequestOutput]
    ) -> None:
        if output is not None:
            into.append(output)
            if request.queue is not None:
                request.queue.put_nowait(output)
        if request.num_unfinished == 0:
            self._forget(request)

    def _forget(self, request: RequestState) -> None:
        self._requests.pop(request.request_id, None)
        for s in request.samples:
            self._samples.pop(s.engine_id, None)


def _validate_request(request_id, prompt_token_ids, params, output_kind, queue) -> None:
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
    if not prompt_token_ids:
        raise ValueError(f"request {request_id!r}: prompt_token_ids must not be empty")
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    if not isinstance(output_kind, RequestOutputKind):
        raise TypeError(f"output_kind must be a RequestOutputKind, got {output_kind!r}")
    for s in params.stop or ():
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
    if queue is not None and not callable(getattr(queue, "put_nowait", None)):
        raise TypeError(f"queue must have put_nowait(), got {type(queue).__name__}")
