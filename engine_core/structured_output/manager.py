"""The EngineCore's structured outputs: grammars compiled off the loop, one matcher a request.

Compiles are keyed and LRU-cached by the exact spec; the scheduler polls `GrammarState.ready`
and keeps the request waiting meanwhile. Each of a small pool of threads hands its compiles
to a child process of its own (compile_process.py), so that a compile over the time limit
is killed, and the next compile of that thread gets a fresh child: a runaway schema fails
its request and stops costing CPU. The timed-out spec stays cached as failed, so that the
same schema sent again fails at once instead of burning another time limit.

The vocabulary (xgrammar's TokenizerInfo) is built once, by the first compile, from the
tokenizer the frontend uses (its converted copy is cached on disk); the children get it as
JSON when they start. Neither the children's start nor the vocabulary counts against the
time limit.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from engine_core.config import EngineConfig
from engine_core.protocol import (
    FinishReason,
    GrammarOutput,
    SchedulerOutput,
    StructuredOutputsParams,
)
from engine_core.structured_output.compile_process import CompileProcess, CompileTimeout

if TYPE_CHECKING:
    from engine_core.sched.request import Request

_NUM_COMPILE_THREADS = 2
# In every error of a request whose grammar failed: the frontend answers those with a 400.
GRAMMAR_ERROR_MARK = "structured output grammar"
_CACHE_SIZE = 256  # compiled grammars kept (LRU)


class GrammarState:
    """One request's grammar: compiling, failed, or a matcher advanced by its accepted tokens."""

    def __init__(self, manager: StructuredOutputManager, key: tuple, job: _CompileJob) -> None:
        self._manager = manager
        self.key = key
        self._job = job
        self._future = job.future
        self.matcher: Any = None
        self.error: str | None = None

    def ready(self) -> bool:
        """True once the matcher exists; False while compiling or once failed (see error)."""
        if self.matcher is not None:
            return True
        if self.error is not None:
            return False
        if not self._future.done():
            started = self._job.started
            if started is not None and time.monotonic() - started > self._manager.compile_timeout:
                self.error = self._manager.timeout_error()
            return False
        try:
            compiled = self._future.result()
        except CompileTimeout:
            self.error = self._manager.timeout_error()
            return False
        except Exception as e:
            self.error = f"the {GRAMMAR_ERROR_MARK} failed to compile: {e}"
            return False
        self.matcher = self._manager.new_matcher(compiled)
        return True

    @property
    def failed(self) -> bool:
        return self.error is not None

    def accept_tokens(self, token_ids: list[int]) -> bool:
        """Advance by sampled tokens; False if the grammar refuses one (the rest are skipped)."""
        for t in token_ids:
            if not self.matcher.accept_token(t):
                return False
        return True

    def advance(self, request: Request, token_ids: list[int]) -> None:
        """The tokens a request emitted advance its matcher; a terminated grammar ends it."""
        if not self.accept_tokens(token_ids):
            request.error = (
                f"request {request.request_id!r}: a sampled token broke its structured output "
                "grammar."
            )
            request.finish(FinishReason.ERROR)
        elif self.is_terminated():
            request.finish(FinishReason.STOP)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        """Row `row` of `bitmask`: the tokens the grammar allows next."""
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def valid_draft_prefix(self, draft_token_ids: list[int]) -> int:
        """How many leading drafts the grammar accepts without terminating (matcher unmoved).

        A draft that ends the grammar is dropped with those after it: only the step's last
        emitted token (a sampled one) can then terminate it.
        """
        taken = keep = 0
        for t in draft_token_ids:
            if not self.matcher.accept_token(t):
                break
            taken += 1
            if self.matcher.is_terminated():
                break
            keep += 1
        if taken:
            self.matcher.rollback(taken)
        return keep

    def fill_bitmask_for_drafts(
        self, bitmask: Any, first_row: int, draft_token_ids: list[int]
    ) -> int:
        """One row per position: the next token, then after each draft token in turn; the
        matcher is rolled back afterwards. Returns the rows filled.

        A draft token the grammar refuses ends the rows there (the rows after it stay as
        they were: the rejection sampler never reaches them, the refused draft's own row
        masks it).
        """
        rows = 0
        accepted = 0
        for pos in range(len(draft_token_ids) + 1):
            self.matcher.fill_next_token_bitmask(bitmask, first_row + pos)
            rows += 1
            if pos == len(draft_token_ids) or self.matcher.is_terminated():
                break
            if not self.matcher.accept_token(draft_token_ids[pos]):
                break
            accepted += 1
        if accepted:
            self.matcher.rollback(accepted)
        return rows


class _CompileJob:
    """One spec's compile, shared by every request with that spec."""

    __slots__ = ("future", "started")

    def __init__(self) -> None:
        self.future: Any = None
        # When the compile itself began (the vocabulary is built first, once, untimed).
        self.started: float | None = None


class StructuredOutputManager:
    """Compile pool, compiled-grammar cache and the per-step bitmask of the structured rows."""

    def __init__(self, config: EngineConfig, vocab_size: int) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self.compile_timeout = config.structured_outputs_compile_timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(
            _NUM_COMPILE_THREADS, thread_name_prefix="grammar-compile"
        )
        self._lock = threading.Lock()
        self._tokenizer_info: Any = None
        self._tokenizer_info_json = ""
        self._local = threading.local()  # each compile thread's CompileProcess
        self._children: list[CompileProcess] = []
        # Children die with the manager even if shutdown is never called.
        weakref.finalize(self, _kill_children, self._children)
        # key -> the compile of a CompiledGrammar (done ones are the cache, LRU order)
        self._cache: collections.OrderedDict[tuple, _CompileJob] = collections.OrderedDict()
        self._bitmask: Any = None

    # ---------------------------------------------------------------- compiling

    def grammar_for(self, params: StructuredOutputsParams) -> GrammarState:
        """Start (or share, or reuse) the compile of a spec; never blocks."""
        key = params.key()
        with self._lock:
            job = self._cache.get(key)
            if job is not None and job.future.done():
                error = job.future.exception()
                # A failed compile is not cached (it may have been transient), a timed-out one
                # is: the same schema would only burn the time limit again.
                if error is not None and not isinstance(error, CompileTimeout):
                    job = None
            if job is None:
                job = _CompileJob()
                job.future = self._pool.submit(self._compile, params, job)
                self._cache[key] = job
            self._cache.move_to_end(key)
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return GrammarState(self, key, job)

    def _compile(self, params: StructuredOutputsParams, job: _CompileJob) -> Any:
        import xgrammar as xgr

        info = self._get_tokenizer_info()
        child: CompileProcess | None = getattr(self._local, "child", None)
        if child is None or not child.alive:
            child = self._local.child = CompileProcess(self._tokenizer_info_json)
            with self._lock:
                self._children[:] = [c for c in self._children if c.alive] + [child]
        # The time limit starts once a child is ready to compile (it reads the spec then).
        job.started = time.monotonic()
        compiled_json = child.compile(params, self.compile_timeout)
        return xgr.CompiledGrammar.deserialize_json(compiled_json, info)

    def _get_tokenizer_info(self) -> Any:
        with self._lock:
            if self._tokenizer_info is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(
                    _load_tokenizer(self.config), vocab_size=self.vocab_size
                )
                self._tokenizer_info_json = info.serialize_json()
                self._tokenizer_info = info
            return self._tokenizer_info

    def timeout_error(self) -> str:
        return (
            f"the {GRAMMAR_ERROR_MARK} did not compile within the time limit "
            f"of {self.compile_timeout:g} s (--structured-outputs-compile-timeout)."
        )

    def wait_for_compiles(self, requests: list[Request], timeout: float) -> None:
        """Block up to `timeout` seconds for one of the requests' compiles to finish."""
        states = [r.grammar for r in requests if r.grammar is not None]
        futures = [s._future for s in states if s.matcher is None and s.error is None]
        if futures:
            concurrent.futures.wait(
                futures, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
            )

    def new_matcher(self, compiled: Any) -> Any:
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)

    # ---------------------------------------------------------------- the step

    def attach(self, request: Request) -> None:
        """Start (or share) the compile of a new request's grammar, if it has one."""
        spec = request.sampling_params.structured_outputs
        if spec is not None:
            request.grammar = self.grammar_for(spec)

    def masked_req_ids(
        self, requests: dict[str, Request], num_scheduled: dict[str, int]
    ) -> list[str]:
        """The scheduled requests that sample under a grammar this step, in step order."""
        return [
            req_id
            for req_id, num_new in num_scheduled.items()
            if (r := requests[req_id]).grammar is not None
            and r.num_computed_tokens + num_new >= r.num_tokens
        ]

    def grammar_bitmask(
        self, requests: dict[str, Request], scheduler_output: SchedulerOutput
    ) -> GrammarOutput | None:
        """The step's bitmask: per structured request, a row for each of its positions (the
        next token, then after each of its drafts), as the model runner applies them."""
        import xgrammar as xgr

        so = scheduler_output
        if not so.structured_req_ids:
            return None
        spec = so.scheduled_spec_decode_tokens
        n = sum(1 + len(spec.get(r, ())) for r in so.structured_req_ids)
        if self._bitmask is None or self._bitmask.shape[0] < n:
            rows = max(n, self.config.max_num_seqs)
            self._bitmask = xgr.allocate_token_bitmask(rows, self.vocab_size)
        bitmask = self._bitmask[:n]
        bitmask.fill_(-1)  # rows past a refused draft: never reached, left open
        row = 0
        for req_id in so.structured_req_ids:
            grammar = requests[req_id].grammar
            assert grammar is not None and grammar.matcher is not None, "masked while compiling"
            drafts = spec.get(req_id, [])
            if drafts:
                grammar.fill_bitmask_for_drafts(bitmask, row, drafts)
            else:
                grammar.fill_bitmask(bitmask, row)
            row += 1 + len(drafts)
        return GrammarOutput(
            structured_req_ids=so.structured_req_ids, grammar_bitmask=bitmask.numpy().tobytes()
        )

    def validate_drafts(self, requests: list[Request]) -> None:
        """Cut each structured request's drafts where its grammar refuses one (vLLM's
        validate_tokens): a draft that cannot be emitted is not worth a forward position."""
        for r in requests:
            if r.spec_token_ids and r.grammar is not None and r.grammar.matcher is not None:
                r.spec_token_ids = r.spec_token_ids[
                    : r.grammar.valid_draft_prefix(r.spec_token_ids)
                ]

    def shutdown(self) -> None:
        """Stop the compiles: queued ones are dropped, running ones killed with their child."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            _kill_children(self._children)


def _kill_children(children: list[CompileProcess]) -> None:
    for child in children:
        child.kill()
    children.clear()


def _load_tokenizer(config: EngineConfig) -> Any:
    # The frontend's loader: the same vocabulary the frontend encodes and decodes with.
    from engine_core.tokenizer import load_tokenizer

    return load_tokenizer(config.model, config.tokenizer)
