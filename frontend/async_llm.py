"""AsyncLLM: the EngineCore as an asyncio server sees it, one async generator per request."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import signal
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from engine_core.config import EngineConfig
from engine_core.protocol import EngineCoreOutputs, SamplingParams, SchedulerStats
from frontend.core_client import EngineCoreClient, EngineDeadError
from frontend.metrics import Metrics
from frontend.output_processor import OutputProcessor
from frontend.outputs import RequestOutput, RequestOutputKind
from frontend.tokenizer import load_tokenizer

logger = logging.getLogger("ringserve.frontend")

_EXIT_GRACE_S = 0.5
_RECENT_S = 1.0  # a core that sent a message this recently is answering


class RequestFailedError(RuntimeError):
    """The engine failed one request (it stays up for the others)."""


class AsyncLLM:
    """Routes the core's outputs to per-request asyncio queues; never blocks or spins the loop.

    The core's output queue wakes the loop through a file descriptor (`loop.add_reader`), and
    every wake-up drains every ready message. The core process's pidfd wakes the loop the
    moment the process exits, so that requests in flight fail at once, not after a timeout.
    """

    def __init__(self, config: EngineConfig, client: EngineCoreClient, tokenizer) -> None:
        self.config = config
        self.client = client
        self.tokenizer = tokenizer
        self.ready = client.ready
        self.max_model_len = client.ready.max_model_len
        self.vocab_size = client.ready.vocab_size
        self.processor = OutputProcessor(tokenizer)
        self.metrics: Metrics | None = None
        # Until the core's first stats: nothing held; the pool but its null block is usable.
        usable = client.ready.num_blocks - 1
        self.stats = SchedulerStats(num_usable_blocks=usable, num_free_blocks=usable)
        self.dead_reason: str | None = None
        self.on_dead: Callable[[str], None] | None = None
        self._added_since_stats = 0  # engine requests sent since the last scheduler stats
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._active: set[str] = set()  # user request ids with a generate() running
        self._why: str | None = None  # what the output queue said when the core went away
        self._last_message = 0.0  # time.monotonic() of the core's last message
        self._loop = asyncio.get_running_loop()
        self._fds: list[int] = []
        self._closed = False
        self._watch(client.output_fileno(), self._drain_outputs)
        self._watch(client.process_sentinel_fd(), self._on_core_exit)

    @classmethod
    async def start(
        cls,
        config: EngineConfig,
        startup_timeout: float = 300.0,
        *,
        client: concurrent.futures.Future | None = None,
        tokenizer: concurrent.futures.Future | None = None,
    ) -> AsyncLLM:
        """Start the EngineCore process and load the tokenizer side by side, off the loop.

        client, tokenizer: that work already under way on threads (frontend/startup.py), as
        futures of a ready EngineCoreClient and of the tokenizer; awaited instead.
        """
        loop = asyncio.get_running_loop()
        client_f = (
            asyncio.wrap_future(client)
            if client is not None
            else loop.run_in_executor(None, EngineCoreClient, config, startup_timeout)
        )
        tok_f = (
            asyncio.wrap_future(tokenizer)
            if tokenizer is not None
            else loop.run_in_executor(None, load_tokenizer, config.model, config.tokenizer)
        )
        results: Any = await asyncio.gather(client_f, tok_f, return_exceptions=True)
        started, tok = results
        for result in (started, tok):
            if isinstance(result, BaseException):
                if isinstance(started, EngineCoreClient):
                    started.shutdown()
                raise result
        return cls(config, started, tok)

    # ---------------------------------------------------------------- requests

    async def generate(
        self,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        output_kind: RequestOutputKind = RequestOutputKind.DELTA,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yield the request's outputs until it finishes; leaving early aborts it in the core."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        core_reqs = self.processor.add_request(
            request_id, prompt, prompt_token_ids, params, time.monotonic(), output_kind, queue=queue
        )
        finished = False
        self._active.add(request_id)
        try:
            for req in core_reqs:
                self.client.add_request(req)
                self._added_since_stats += 1
            while not finished:
                out = queue.get_nowait() if not queue.empty() else await queue.get()
                if out.error is not None:
                    dead = self.dead_reason is not None
                    raise (EngineDeadError if dead else RequestFailedError)(out.error)
                finished = out.finished
                yield out
        finally:
            self._active.discard(request_id)
            if not finished:
                self.abort(request_id)

    async def generate_many(
        self,
        requests: list[tuple[str | None, list[int], SamplingParams, str]],
        output_kind: RequestOutputKind,
    ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """Run several requests, each (prompt, prompt_token_ids, params, request_id), and yield
        their outputs as they come, tagged with the request's index; leaving early aborts all."""
        if len(requests) == 1:
            async with contextlib.aclosing(self.generate(*requests[0], output_kind)) as gen:
                async for out in gen:
                    yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, request: tuple[str | None, list[int], SamplingParams, str]) -> None:
            try:
                async with contextlib.aclosing(self.generate(*request, output_kind)) as gen:
                    async for out in gen:
                        queue.put_nowait((i, out, None))
            except Exception as e:
                queue.put_nowait((i, None, e))
            finally:
                queue.put_nowait((i, None, None))

        tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
        try:
            remaining = len(tasks)
            while remaining:
                i, out, err = await queue.get()
                if err is not None:
                    raise err
                if out is None:
                    remaining -= 1
                    continue
                yield i, out
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def abort(self, request_id: str) -> None:
        """Forget a request here and stop it in the core (its KV blocks are freed there)."""
        engine_ids = self.processor.abort_requests([request_id])
        if engine_ids and self.dead_reason is None:
            try:
                self.client.abort_requests(engine_ids)
            except EngineDeadError:
                pass  # the exit watcher reports it

    def abort_all(self) -> None:
        """Abort every request in flight; each ends with finish_reason "abort" (drain timeout)."""
        for request_id in list(self._active):
            self.abort(request_id)

    def num_waiting(self, extra: int = 0) -> int:
        """Requests that would wait in the scheduler with `extra` more: its last count plus
        those sent since, which count as waiting only beyond the free running slots."""
        s = self.stats
        free_slots = max(0, self.config.max_num_seqs - s.num_running_reqs - s.num_waiting_reqs)
        return s.num_waiting_reqs + max(0, self._added_since_stats + extra - free_slots)

    async def check_health(self, timeout: float = 10.0) -> bool:
        """True when the core answers: it sent something in the last second, or it answers a
        ping within `timeout` seconds (whose reply also refreshes the scheduler stats)."""
        if self.dead_reason is not None:
            return False
        if time.monotonic() - self._last_message < _RECENT_S:
            return True
        call_id = next(self._call_ids)
        fut = self._loop.create_future()
        self._calls[call_id] = fut
        try:
            self.client.call_utility_nowait(call_id, "ping")
            await asyncio.wait_for(fut, timeout)
            return True
        except (asyncio.TimeoutError, EngineDeadError, RuntimeError):
            return False
        finally:
            self._calls.pop(call_id, None)

    # ---------------------------------------------------------------- core outputs

    def _watch(self, fd: int, callback: Callable[[], None]) -> None:
        self._loop.add_reader(fd, callback)
        self._fds.append(fd)

    def _unwatch(self) -> None:
        for fd in self._fds:
            self._loop.remove_reader(fd)
        self._fds.clear()

    def _drain_outputs(self) -> None:
        try:
            why = self._drain()
        except Exception as e:
            # A message we cannot read or apply may have carried tokens: requests would hang.
            logger.exception("failed to process the engine core's outputs")
            self._die(f"failed to process the engine core's outputs: {type(e).__name__}: {e}")
            return
        if why is not None and self.dead_reason is None:
            self._why = why
            if self.client.proc.poll() is None:
                # The queue closes before the kernel reports the exit: give the exit watcher a
                # moment to name the cause (a signal, an exit code).
                self._loop.remove_reader(self.client.output_fileno())
                self._loop.call_later(_EXIT_GRACE_S, self._on_core_exit)
            else:
                self._on_core_exit()

    def _drain(self) -> str | None:
        """Handle every ready message; the reason the core is gone, if the queue says so."""
        try:
            while (outs := self.client.get_outputs_nowait()) is not None:
                self._handle(outs)
        except EngineDeadError as e:
            return str(e)
        return None

    def _handle(self, outs: EngineCoreOutputs) -> None:
        self._last_message = time.monotonic()
        if outs.outputs:
            processed = self.processor.process_outputs(outs.outputs, time.monotonic())
            if processed.reqs_to_abort:
                # Stop strings end requests here; the core must stop them too.
                self.client.abort_requests(processed.reqs_to_abort)
            if self.metrics is not None:
                self.metrics.observe_iteration(processed.iteration_stats)
        if outs.scheduler_stats is not None:
            self.stats = outs.scheduler_stats
            self._added_since_stats = 0
            if self.metrics is not None:
                self.metrics.observe_scheduler(outs.scheduler_stats)
        u = outs.utility_output
        if u is not None:
            fut = self._calls.pop(u.call_id, None)
            if fut is not None and not fut.done():
                if u.error is not None:
                    fut.set_exception(RuntimeError(u.error))
                else:
                    fut.set_result(u.result)

    def _on_core_exit(self) -> None:
        if self.dead_reason is not None:
            return
        # Messages the core wrote before it exited (its failure, last tokens) come first.
        with contextlib.suppress(Exception):
            self._why = self._drain() or self._why
        code = self.client.proc.poll()
        why = self._why
        if code is None:
            reason = why or "the engine core stopped answering"
        elif why and why.startswith("the engine core failed"):  # it said why before exiting
            reason = f"{why} ({_describe_exit(code)})"
        else:
            reason = _describe_exit(code)
        self._die(reason)

    def _die(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        self._unwatch()
        if not self._closed:
            logger.error("engine core died: %s", reason)
        self.processor.fail_all(reason)
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(EngineDeadError(reason))
        if self.on_dead is not None and not self._closed:
            self.on_dead(reason)

    def shutdown(self) -> None:
        """Stop the EngineCore process and release its queues; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._unwatch()
        self.client.shutdown()
        if self.dead_reason is None:
            self.dead_reason = "the server is shutting down"
            self.processor.fail_all(self.dead_reason)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "the engine core stopped answering"
    if code < 0:
        return f"the engine core process was killed by {signal.Signals(-code).name}"
    return f"the engine core process exited with code {code}"
