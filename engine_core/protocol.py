"""The wire contract between the frontend, the EngineCore and its workers.

Everything that crosses a process boundary is one of these msgspec Structs, encoded as
msgpack (array_like, so field names never travel). Nothing here is ever pickled.
"""

from __future__ import annotations

import enum
import math

import msgspec

_STRUCT = dict(array_like=True, omit_defaults=True, gc=False)

# Sampling defaults follow vLLM's SamplingParams.
_DEFAULT_MAX_TOKENS = 16
# vLLM's default max_logprobs: the most top logprobs one request may ask for.
MAX_LOGPROBS = 20


class StructuredOutputsParams(msgspec.Struct, **_STRUCT):
    """Constrain a request's output: exactly one of json, regex, choice, grammar, json_object,
    structural_tag (vLLM's names). `json` may be a schema dict or its JSON text; it travels as
    canonical JSON text, which is also the compile cache's key."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (GBNF)
    json_object: bool | None = None
    structural_tag: str | None = None  # xgrammar's structural tag, as JSON text
    whitespace_pattern: str | None = None  # json/json_object: the regex of whitespace allowed
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            self.json = msgspec.json.encode(self.json).decode()
        kinds = [k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError(
                "structured_outputs must have exactly one of "
                f"{', '.join(_STRUCTURED_KINDS)}; got {', '.join(kinds) or 'none'}."
            )
        if self.choice is not None and not self.choice:
            raise ValueError("structured_outputs.choice must be a non-empty list of strings.")

    @property
    def kind(self) -> str:
        return next(k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple:
        """The exact spec: what a compiled grammar is cached under."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "choice":
            value = tuple(value)
        return (kind, value, self.whitespace_pattern, self.disable_any_whitespace)


_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


class SamplingParams(msgspec.Struct, **_STRUCT):
    """How one request samples its tokens and when it stops (vLLM's names and defaults)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = _DEFAULT_MAX_TOKENS  # None: up to the model's context
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] | None = None  # stop strings: applied by the frontend
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's plus top-k
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # compiled by the EngineCore

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range field."""
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if not 0.0 <= self.temperature < math.inf:
            raise ValueError(
                f"temperature must be non-negative and finite, got {self.temperature}."
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            raise ValueError(
                f"top_k must be -1 (disable), 0 (disable) or at least 1, got {self.top_k}."
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not 0.0 < self.repetition_penalty < math.inf:
            raise ValueError(
                f"repetition_penalty must be greater than zero and finite, got {self.repetition_penalty}."
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}.")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}.")
        for tid in self.stop_token_ids or ():
            if tid < 0:
                raise ValueError(f"stop_token_ids must be non-negative, got {tid}.")
        for tid, bias in (self.logit_bias or {}).items():
            if tid < 0:
                raise ValueError(f"logit_bias keys must be token ids (non-negative), got {tid}.")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias for token {tid} must be in [-100, 100], got {bias}.")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


class FinishReason(enum.IntEnum):
    STOP = 0  # EOS, a stop token or a stop string
    LENGTH = 1  # max_tokens or the model's context
    ABORT = 2  # aborted by the client or the frontend
    ERROR = 3  # the engine failed the request

    def __str__(self) -> str:
        return self.name.lower()


# ---------------------------------------------------------------- frontend -> core


class EngineCoreRequest(msgspec.Struct, tag="add", **_STRUCT):
    """Add one request (one sample: the frontend fans n > 1 out into n requests)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = 0.0


class AbortRequests(msgspec.Struct, tag="abort", **_STRUCT):
    request_ids: list[str]


class UtilityRequest(msgspec.Struct, tag="utility", **_STRUCT):
    """A call answered once by the core: 'ping', 'reset_prefix_cache', 'stats', 'shutdown'."""

    call_id: int
    method: str


EngineCoreInput = EngineCoreRequest | AbortRequests | UtilityRequest

# ---------------------------------------------------------------- core -> frontend


class Logprobs(msgspec.Struct, **_STRUCT):
    """Logprobs for one generated position: the sampled token first, then the top-k."""

    token_ids: list[int]
    logprobs: list[float]
    sampled_rank: int = 0  # 1-based rank of the sampled token in the whole vocabulary


class EngineCoreOutput(msgspec.Struct, **_STRUCT):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[Logprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None  # the stop token id that ended it, if any
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct, **_STRUCT):
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0  # tokens looked up since the last stats
    prefix_cache_hits: int = 0  # tokens found since the last stats
    num_preemptions: int = 0  # since the last stats
    num_free_blocks: int = 0
    num_usable_blocks: int = 0  # blocks requests can hold: the pool but its null block
    # Speculative decoding since the last stats (vLLM's SpecDecodingStats): requests that had
    # drafts verified, drafts verified, drafts accepted, and accepted per draft position.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_accepted_tokens_per_pos: list[int] = []


class UtilityOutput(msgspec.Struct, **_STRUCT):
    call_id: int
    result: bytes = b""  # msgpack of the result
    error: str | None = None


class EngineCoreOutputs(msgspec.Struct, **_STRUCT):
    """One message per engine step (or per utility answer)."""

    outputs: list[EngineCoreOutput] = []
    scheduler_stats: SchedulerStats | None = None
    utility_output: UtilityOutput | None = None
    timestamp: float = 0.0
    # Set once, when the core is about to exit because of a failure.
    engine_dead: str | None = None


class EngineReady(msgspec.Struct, **_STRUCT):
    """The core's first message: what the frontend needs to validate requests."""

    num_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    startup_log: list[str] = []


# ---------------------------------------------------------------- core -> workers (TP)


class NewRequestData(msgspec.Struct, **_STRUCT):
    """A request the model runner has not seen (or sees again after a preemption)."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty when resumed after a preemption
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


class CachedRequestData(msgspec.Struct, **_STRUCT):
    """A request the runner already holds: what changed since its last step."""

    req_id: str
    new_token_ids: list[int]  # tokens sampled since the runner last saw it
    new_block_ids: list[int]
    num_computed_tokens: int
    # Trailing blocks the scheduler freed since (rejected drafts' lookahead): the runner drops
    # them from the end of its block table before appending new_block_ids.
    num_dropped_blocks: int = 0


class SchedulerOutput(msgspec.Struct, **_STRUCT):
    """One step's decision: which requests run, and how many tokens each."""

    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests that finished or were aborted since the last step: the runner drops them.
    finished_req_ids: list[str] = []
    # Requests preempted since the last step: the runner drops them too (they come back, if
    # they do, as new requests that recompute).
    preempted_req_ids: list[str] = []
    # Structured outputs: the requests that sample under a grammar this step, in step order.
    # Their bitmask (GrammarOutput) is filled while the model runs and joins the step before
    # sampling.
    structured_req_ids: list[str] = []
    # Speculative decoding: draft tokens per request, scheduled after its last token (counted in
    # num_scheduled_tokens); the runner verifies them. Every TP rank gets them with the step.
    scheduled_spec_decode_tokens: dict[str, list[int]] = {}


class GrammarOutput(msgspec.Struct, **_STRUCT):
    """A step's grammar bitmask, for sampling: per request of structured_req_ids, one row per
    position it samples (1 + its scheduled drafts), each row ceil(vocab / 32) int32 words (bit
    t set: token t allowed), little-endian bytes (broadcast to TP workers: no tensor)."""

    structured_req_ids: list[str]
    grammar_bitmask: bytes


class ModelRunnerOutput(msgspec.Struct, **_STRUCT):
    """What one step sampled: one entry per request that reached the end of its tokens."""

    req_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[Logprobs] | None = None  # parallel to req_ids, None where not asked
    # With drafts in the step: per request, every token it emits (accepted drafts, then the
    # target's token); sampled_token_ids[i] is the first of them. Logprobs likewise.
    emitted_token_ids: list[list[int]] | None = None
    emitted_logprobs: list[list[Logprobs] | None] | None = None


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def decoder(type_: type) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(type_)


# ---------------------------------------------------------------- start-up handshake (over ZMQ)


class EngineHandshake(msgspec.Struct, **_STRUCT):
    """Frontend -> core, once: the configuration and the input queue to attach to."""

    config_json: bytes  # msgspec JSON of EngineConfig
    input_queue: bytes  # msgpack of ipc.MessageQueueHandle


class EngineHandshakeReply(msgspec.Struct, **_STRUCT):
    """Core -> frontend, once: ready (with its output queue) or the error that stopped start-up."""

    ready: EngineReady | None = None
    output_queue: bytes = b""  # msgpack of ipc.MessageQueueHandle
    error: str | None = None


# ---------------------------------------------------------------- executor <-> TP workers


class WorkerHandshake(msgspec.Struct, **_STRUCT):
    """Executor -> worker, once over ZMQ: its rank, the configuration and where to meet."""

    rank: int
    config_json: bytes  # msgspec JSON of EngineConfig
    dist_init_method: str  # tcp://127.0.0.1:PORT, the process group's rendezvous
    broadcast_queue: bytes  # msgpack of ipc.MessageQueueHandle: the step broadcast


class WorkerModelConfig(msgspec.Struct, **_STRUCT):
    """The model facts the EngineCore needs from its workers."""

    vocab_size: int
    eos_token_ids: list[int]


class WorkerReady(msgspec.Struct, **_STRUCT):
    num_blocks: int  # the minimum over ranks: every rank holds this many
    max_model_len: int
    model_config: WorkerModelConfig
    weight_bytes: int  # bytes of weights this rank holds
    kv_cache_bytes: int


class WorkerHandshakeReply(msgspec.Struct, **_STRUCT):
    """Worker -> executor, once: ready (rank 0 adds its result queue) or its start-up error."""

    ready: WorkerReady | None = None
    result_queue: bytes = b""  # rank 0: msgpack of ipc.MessageQueueHandle
    error: str | None = None


class WorkerExecute(msgspec.Struct, tag="execute", **_STRUCT):
    """Broadcast: run one step; rank 0 answers with a WorkerOutput (a step with structured
    rows waits for its WorkerSample, and rank 0 answers that instead)."""

    scheduler_output: SchedulerOutput


class WorkerWarmup(msgspec.Struct, tag="warmup", **_STRUCT):
    """Broadcast: run the warm-up forwards; rank 0 answers with an empty WorkerOutput."""


class WorkerShutdown(msgspec.Struct, tag="shutdown", **_STRUCT):
    """Broadcast: leave the process group and exit."""


class WorkerSample(msgspec.Struct, tag="sample", **_STRUCT):
    """Broadcast: sample the step just run, whose structured rows waited for this bitmask
    (rank 0 answers with a WorkerOutput; the other ranks have nothing to do)."""

    grammar_output: GrammarOutput


WorkerInput = WorkerExecute | WorkerSample | WorkerWarmup | WorkerShutdown


class WorkerOutput(msgspec.Struct, **_STRUCT):
    """Rank 0 -> executor: one per step (after its WorkerExecute, or its WorkerSample) and
    one per WorkerWarmup."""

    runner_output: ModelRunnerOutput | None = None
    error: str | None = None  # the step failed: the worker exits after sending this
