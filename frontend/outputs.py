"""What a user gets back for a request (vLLM's shapes), and the statistics the server exports."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestOutputKind(enum.Enum):
    """How much each RequestOutput of a request carries."""

    CUMULATIVE = 0  # everything generated so far, every time
    DELTA = 1  # only what is new since the previous output (streaming)
    FINAL_ONLY = 2  # one output, at the end, with everything


@dataclass(slots=True)
class Logprob:
    """The log-probability of one token at one position."""

    logprob: float
    rank: int | None = None  # 1-based, in the whole vocabulary
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    """One of a request's n samples."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None  # per position: the sampled token first
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    """A request's timeline on the time.monotonic() clock, updated while it runs.

    The same object is shared by all RequestOutputs of a request, so it always shows the latest.
    """

    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_generation_tokens: int = 0  # over all n samples


@dataclass(slots=True)
class RequestOutput:
    """One request's output at one point of its generation."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    error: str | None = None
    metrics: RequestMetrics | None = None


@dataclass(slots=True)
class FinishedRequestStats:
    """Latencies of one finished engine request (one sample), for the server's histograms."""

    request_id: str
    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency: float  # arrival -> finished
    # Arrival -> first token: the frontend never learns when the core first scheduled a
    # request, so the queue time it reports includes the prefill of the first chunk.
    queue_time: float | None
    time_to_first_token: float | None
    decode_time: float | None  # first token -> last token
    mean_time_per_output_token: float | None  # decode_time over the tokens after the first


@dataclass(slots=True)
class IterationStats:
    """What one process_outputs() call saw, for the server's counters and histograms.

    Prompt tokens are counted when a sample gets its first token (each of n samples counts
    its prompt, as vLLM counts each engine request).
    """

    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)  # one per sample and step
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)
