"""EngineCore: the busy loop that schedules, runs the model and pushes outputs.

One process. It drains its input MessageQueue between steps (never blocking while it has
work), blocks on the queue's wake-up when it has none, and sends one EngineCoreOutputs
message per step on its output MessageQueue.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import signal
import time
import traceback

import msgspec

from engine_core.config import EngineConfig
from engine_core.executor import Executor, make_executor
from engine_core.process import connect_handshake, reply_startup_error, start_child_process
from engine_core.protocol import (
    AbortRequests,
    EngineCoreInput,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineHandshake,
    EngineHandshakeReply,
    EngineReady,
    FinishReason,
    UtilityOutput,
    UtilityRequest,
)
from engine_core.sched.request import Request
from engine_core.sched.scheduler import Scheduler
from engine_core.spec_decode import make_drafter
from engine_core.structured_output.manager import StructuredOutputManager
from ipc import MessageQueue, MessageQueueHandle, PeerDiedError

logger = logging.getLogger("ringserve.engine_core")

# How long an idle core blocks on its input queue before checking that its parent lives.
_IDLE_POLL_S = 1.0


class EngineCore:
    """Owns the scheduler and the model executor; one `step()` is one forward pass."""

    def __init__(self, config: EngineConfig) -> None:
        # The step's token budget settled once, so that the scheduler, the model runner and
        # any TP worker (sent this config) plan the same steps.
        budget = config.resolved_max_num_batched_tokens()
        config = dataclasses.replace(config, max_num_batched_tokens=budget)
        self.config = config
        self.startup_log: list[str] = []
        self._log(f"step token budget: {budget} tokens ({config.usage_context} defaults)")
        t0 = time.perf_counter()
        self.executor: Executor = make_executor(config)
        self._log(f"model loaded in {time.perf_counter() - t0:.2f} s")
        self.max_model_len = self.executor.max_model_len
        self.block_size = config.block_size
        self.num_blocks = self.executor.num_blocks
        self._log(
            f"KV cache: {self.num_blocks} blocks of {self.block_size} tokens "
            f"= {self.num_blocks * self.block_size} tokens"
        )
        t0 = time.perf_counter()
        self.executor.warmup()
        self._log(f"warm-up done in {time.perf_counter() - t0:.2f} s")
        # What start-up built (the model, the tokenizer tables, torch's and the kernels'
        # objects) lives as long as the process: out of the collector's scans (vLLM freezes
        # it too), which were ~1.5% of a batched run's CPU time.
        gc.collect()
        gc.freeze()
        self.eos_token_ids = list(self.executor.model_config.eos_token_ids)
        self.vocab_size = self.executor.model_config.vocab_size
        self.scheduler = Scheduler(config, self.num_blocks, self.max_model_len)
        self.structured_output = StructuredOutputManager(config, self.vocab_size)
        self.scheduler.structured_output = self.structured_output
        # Speculative decoding: proposes drafts after each step (None: off).
        self.drafter = make_drafter(config)
        # Outputs produced outside a step (rejected requests), sent with the next message.
        self._pending: list[EngineCoreOutput] = []

    def _log(self, line: str) -> None:
        self.startup_log.append(line)
        logger.info(line)

    def ready_message(self) -> EngineReady:
        return EngineReady(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            eos_token_ids=self.eos_token_ids,
            startup_log=self.startup_log,
        )

    # ---------------------------------------------------------------- requests

    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue a request; a bad one is answered with an error output, not an exception."""
        try:
            prompt_len = len(req.prompt_token_ids)
            if prompt_len == 0:
                raise ValueError("the prompt is empty: it must have at least one token.")
            bad = [t for t in req.prompt_token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"token id {bad[0]} is out of vocabulary (size {self.vocab_size})."
                )
            request = Request(
                request_id=req.request_id,
                prompt_token_ids=req.prompt_token_ids,
                sampling_params=req.sampling_params,
                eos_token_ids=self.eos_token_ids,
                arrival_time=req.arrival_time,
                block_size=self.block_size,
            )
            self.scheduler.add_request(request)
        except ValueError as e:
            self._pending.append(
                EngineCoreOutput(
                    request_id=req.request_id,
                    new_token_ids=[],
                    finish_reason=FinishReason.ERROR,
                    error=str(e),
                )
            )

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, FinishReason.ABORT)

    def has_work(self) -> bool:
        return bool(self._pending) or self.scheduler.has_unfinished_requests()

    def step(self) -> EngineCoreOutputs:
        """Schedule, execute, sample and return what each request gained this step."""
        outputs, self._pending = self._pending, []
        if self.scheduler.has_unfinished_requests():
            t0 = time.perf_counter()
            scheduler_output = self.scheduler.schedule()
            runner_output = None
            if scheduler_output.total_num_scheduled_tokens > 0:
                runner_output = self.executor.execute_model(scheduler_output)
                if runner_output is None:  # structured rows: the bitmask fills while it runs
                    grammar_output = self.scheduler.get_grammar_bitmask(scheduler_output)
                    runner_output = self.executor.sample_tokens(grammar_output)
            outputs += self.scheduler.update_from_output(scheduler_output, runner_output)
            if self.drafter is not None:
                self.drafter.propose(self.scheduler)
                self.structured_output.validate_drafts(self.scheduler.running)
                # The whole step, proposing included: what drafts cost is what the switch weighs.
                num = scheduler_output.total_num_scheduled_tokens
                self.drafter.observe_step(num, time.perf_counter() - t0)
        stats = self.scheduler.make_stats()
        if self.drafter is not None:
            self.drafter.record(stats)
        return EngineCoreOutputs(outputs=outputs, scheduler_stats=stats, timestamp=time.time())

    def call_utility(self, req: UtilityRequest) -> UtilityOutput:
        if req.method == "ping":
            result: object = "pong"
        elif req.method == "reset_prefix_cache":
            result = self.scheduler.reset_prefix_cache()
        elif req.method == "stats":
            result = self.scheduler.make_stats(reset=False)
        else:
            return UtilityOutput(
                call_id=req.call_id, error=f"unknown utility method {req.method!r}"
            )
        return UtilityOutput(call_id=req.call_id, result=msgspec.msgpack.encode(result))

    def shutdown(self) -> None:
        self.structured_output.shutdown()
        self.executor.shutdown()


# ---------------------------------------------------------------- the process


class _Shutdown(Exception):
    pass


def _raise_shutdown(signum, frame) -> None:
    raise _Shutdown(signal.Signals(signum).name)


def run_engine_core(handshake_addr: str) -> int:
    """Process entry: handshake over ZMQ, then loop until shut down. Returns the exit code."""
    start_child_process("engine_core", signal.SIGTERM)  # SIGTERM: we clean up our queues first
    parent = os.getppid()
    signal.signal(signal.SIGTERM, _raise_shutdown)
    ctx, sock = connect_handshake(handshake_addr)
    in_q = out_q = core = None
    try:
        hello = msgspec.msgpack.decode(sock.recv(), type=EngineHandshake)
        config = msgspec.json.decode(hello.config_json, type=EngineConfig)
        in_handle = msgspec.msgpack.decode(hello.input_queue, type=MessageQueueHandle)
        in_q = MessageQueue.attach(in_handle, 0, msg_type=EngineCoreInput)
        try:
            core = EngineCore(config)
        except Exception as e:
            reply_startup_error(sock, EngineHandshakeReply, e)
            return 1
        out_q = MessageQueue(n_reader=1, max_chunk_bytes=1 << 20, max_chunks=16)
        reply = EngineHandshakeReply(
            ready=core.ready_message(), output_queue=msgspec.msgpack.encode(out_q.export_handle())
        )
        sock.send(msgspec.msgpack.encode(reply))
        out_q.wait_for_readers(timeout=60.0)
        sock.close()
        _busy_loop(core, in_q, out_q, parent)
        return 0
    except (_Shutdown, PeerDiedError) as e:
        logger.info("engine core shutting down: %s", e)
        return 0
    except Exception as e:
        logger.error("engine core failed: %s", traceback.format_exc())
        if out_q is not None:
            try:
                out_q.enqueue(
                    EngineCoreOutputs(engine_dead=f"{type(e).__name__}: {e}"), timeout=1.0
                )
            except Exception:
                pass
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if core is not None:
            core.shutdown()
        for q in (in_q, out_q):
            if q is not None:
                q.close()
        ctx.destroy(linger=0)


def _busy_loop(core: EngineCore, in_q: MessageQueue, out_q: MessageQueue, parent: int) -> None:
    while True:
        if not core.has_work():
            # Idle: block on the queue's wake-up, waking now and then to notice an orphaning.
            try:
                msg = in_q.dequeue(timeout=_IDLE_POLL_S)
            except TimeoutError:
                if os.getppid() != parent:
                    raise _Shutdown("the frontend process is gone") from None
                # A TP worker that died while we were idle fails the engine now, not later.
                core.executor.check_health()
                continue
            if _handle(core, msg, out_q):
                return
        while (msg := in_q.dequeue_nowait()) is not None:
            if _handle(core, msg, out_q):
                return
        # Every step reports, also a chunked-prefill step with no token: the frontend's
        # gauges (running, waiting, KV usage) follow the core step by step.
        out_q.enqueue(core.step(), timeout=60.0)


def _handle(core: EngineCore, msg: object, out_q: MessageQueue) -> bool:
    """Apply one input message; True means shut down."""
    if isinstance(msg, EngineCoreRequest):
        core.add_request(msg)
    elif isinstance(msg, AbortRequests):
        core.abort_requests(msg.request_ids)
    elif isinstance(msg, UtilityRequest):
        if msg.method == "shutdown":
            return True
        reply = EngineCoreOutputs(
            utility_output=core.call_utility(msg),
            timestamp=time.time(),
        )
        out_q.enqueue(reply, timeout=60.0)
    else:
        raise TypeError(f"unexpected input message {type(msg).__name__}")
    return False
