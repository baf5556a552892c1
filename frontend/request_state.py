"""The frontend's state of one running request (RequestState) and of each of its n samples
(SampleState): the text so far, stop strings, what was already sent, the timings."""

from __future__ import annotations

from operator import attrgetter

import msgspec

from engine_core.protocol import SamplingParams
from frontend.detokenizer import IncrementalDetokenizer, find_stop_string, stop_prefix_length
from frontend.outputs import (
    CompletionOutput,
    FinishedRequestStats,
    Logprob,
    RequestMetrics,
    RequestOutput,
    RequestOutputKind,
)

_SEED_RANGE = 2**64


class SampleState:
    """One engine request: one of a request's n samples, with its text so far."""

    __slots__ = (
        "request", "index", "engine_id", "params", "stop", "stop_chars", "max_stop_len",
        "detokenizer", "text", "token_ids", "logprobs", "cumulative_logprob", "finish_reason",
        "stop_reason", "sent_chars", "sent_tokens", "first_token_time", "last_token_time",
        "changed",
    )  # fmt: skip

    def __init__(
        self, request: RequestState, index: int, engine_id: str, params: SamplingParams, tokenizer
    ) -> None:
        self.request = request
        self.index = index
        self.engine_id = engine_id
        self.params = params
        self.stop = tuple(params.stop or ())
        self.stop_chars = frozenset("".join(self.stop))
        self.max_stop_len = max(map(len, self.stop), default=0)
        self.detokenizer = IncrementalDetokenizer(
            tokenizer,
            request.prompt_token_ids,
            params.skip_special_tokens,
            params.spaces_between_special_tokens,
        )
        self.text = ""
        self.token_ids: list[int] = []
        wants_logprobs = params.logprobs is not None
        self.logprobs: list[dict[int, Logprob]] | None = [] if wants_logprobs else None
        self.cumulative_logprob: float | None = 0.0 if wants_logprobs else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.sent_chars = 0  # DELTA mode: what earlier outputs carried
        self.sent_tokens = 0
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.changed = False  # got an engine output in the current step

    def append_text(self, delta: str, num_tokens: int) -> bool:
        """Append detokenized text; True when it completes a stop string (the text is cut)."""
        if not delta:
            return False
        self.text += delta
        if not self.stop or num_tokens <= self.params.min_tokens:
            return False
        hit = find_stop_string(self.text, len(delta), self.stop)
        if hit is None:
            return False
        stop, start = hit
        self.text = self.text[
            : start + len(stop) if self.params.include_stop_str_in_output else start
        ]
        self.finish_reason, self.stop_reason = "stop", stop
        return True

    def visible_len(self) -> int:
        """How much text may be shown: all of it, except an unfinished end that may still
        turn out to be the beginning of a stop string (never text already sent)."""
        text = self.text
        if (
            not text
            or text[-1] not in self.stop_chars  # the cheap answer for almost every step
            or self.finish_reason is not None
            or self.params.include_stop_str_in_output
        ):
            return len(text)
        limit = min(self.max_stop_len - 1, len(text) - self.sent_chars)
        return len(text) - stop_prefix_length(text, self.stop, limit)

    def completion(self, kind: RequestOutputKind) -> CompletionOutput:
        end = self.visible_len()
        if kind is RequestOutputKind.DELTA:
            text = self.text[self.sent_chars : end]
            token_ids = self.token_ids[self.sent_tokens :]
            logprobs = None if self.logprobs is None else self.logprobs[self.sent_tokens :]
            self.sent_chars, self.sent_tokens = end, len(self.token_ids)
        elif self.finish_reason is not None:  # final: the lists never change again
            text, token_ids, logprobs = self.text, self.token_ids, self.logprobs
        else:
            text, token_ids = self.text[:end], self.token_ids.copy()
            logprobs = None if self.logprobs is None else self.logprobs.copy()
        return CompletionOutput(
            self.index,
            text,
            token_ids,
            self.cumulative_logprob,
            logprobs,
            self.finish_reason,
            self.stop_reason,
        )

    def finished_stats(self, now: float) -> FinishedRequestStats:
        arrival, first = self.request.metrics.arrival_time, self.first_token_time
        n = len(self.token_ids)
        last = self.last_token_time
        decode_time = None if first is None or last is None else last - first
        assert self.finish_reason is not None, "only a finished sample has stats"
        return FinishedRequestStats(
            request_id=self.engine_id,
            finish_reason=self.finish_reason,
            num_prompt_tokens=len(self.request.prompt_token_ids),
            num_generation_tokens=n,
            e2e_latency=now - arrival,
            queue_time=None if first is None else first - arrival,
            time_to_first_token=None if first is None else first - arrival,
            decode_time=decode_time,
            mean_time_per_output_token=decode_time / (n - 1) if decode_time and n > 1 else None,
        )


class RequestState:
    """One user request: its prompt, its n samples, where its outputs go."""

    __slots__ = (
        "request_id", "prompt", "prompt_token_ids", "output_kind", "queue", "samples",
        "num_unfinished", "metrics", "num_cached_tokens", "error",
    )  # fmt: skip

    def __init__(
        self, request_id, prompt, prompt_token_ids, output_kind, queue, arrival_time
    ) -> None:
        self.request_id: str = request_id
        self.prompt: str | None = prompt
        self.prompt_token_ids: list[int] = prompt_token_ids
        self.output_kind: RequestOutputKind = output_kind
        self.queue = queue
        self.samples: list[SampleState] = []
        self.num_unfinished = 0
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.num_cached_tokens = 0
        self.error: str | None = None

    def make_output(self, changed: list[SampleState]) -> RequestOutput | None:
        """The output for this step (`changed`: the samples that got something new), if any."""
        finished = self.num_unfinished == 0
        kind = self.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        samples = changed if kind is RequestOutputKind.DELTA else self.samples
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[s.completion(kind) for s in sorted(samples, key=attrgetter("index"))],
            finished=finished,
            num_cached_tokens=self.num_cached_tokens,
            error=self.error,
            metrics=self.metrics,
        )


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    # As vLLM's ParentRequest: each sample is its own engine request with n=1 and seed+index,
    # so that seeded requests stay reproducible and their samples still differ.
    seed = None if params.seed is None else params.seed + index
    if seed is not None and seed >= _SEED_RANGE:
        seed -= _SEED_RANGE
    return msgspec.structs.replace(params, n=1, seed=seed)
