"""MultiprocExecutor: runs one model sharded over N worker processes (tensor parallelism).

One of the two Executors (engine_core/executor/__init__.py), for tensor_parallel_size > 1.
It starts workers rank 0..N-1
(`python -m engine_core.worker`), each on its own device in one torch.distributed group,
hands each its WorkerHandshake over a ZMQ PAIR socket, then broadcasts every step through
one shared-memory MessageQueue with N readers; rank 0 answers on its own MessageQueue.
Nothing is pickled: the handshake, the steps and the results are msgspec Structs.

This module imports no torch: the EngineCore process only schedules.

Faults. While it waits for rank 0 it checks the workers' processes every _POLL_S, and the
broadcast raises PeerDiedError for a dead reader; either way execute_model raises
WorkerDiedError naming the rank and how it died, after killing the other workers (they may
be blocked in a collective with the dead one). A worker that fails to start reports its error
over the handshake, and the executor raises it (WorkerStartupError), not a hang.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref

import msgspec
import zmq

from engine_core.config import EngineConfig
from engine_core.protocol import (
    GrammarOutput,
    ModelRunnerOutput,
    SchedulerOutput,
    WorkerExecute,
    WorkerHandshake,
    WorkerHandshakeReply,
    WorkerModelConfig,
    WorkerOutput,
    WorkerReady,
    WorkerSample,
    WorkerShutdown,
    WorkerWarmup,
)
from ipc import MessageQueue, MessageQueueHandle, PeerDiedError, new_context

logger = logging.getLogger("ringserve.executor")

_POLL_S = 0.05  # how often a wait for rank 0 checks that every worker lives
_ENQUEUE_TIMEOUT_S = 300.0  # workers run in lock step: a full ring means one is stuck
_SHUTDOWN_GRACE_S = 2.0  # how long workers get to leave the group before SIGKILL
_SETTLE_S = 1.0  # after a failure, how long to wait for the rank that caused it to exit


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker died or failed a step; the executor is unusable after it."""


class WorkerStartupError(RuntimeError):
    """A tensor-parallel worker failed to start; the message carries its reason."""


class MultiprocExecutor:
    """Drives N tensor-parallel worker processes; the EngineCore's Executor for N > 1."""

    def __init__(self, config: EngineConfig, startup_timeout: float = 300.0) -> None:
        assert config.tensor_parallel_size >= 2, "one rank runs in UniprocExecutor"
        self.config = config
        self.world_size = config.tensor_parallel_size
        self.workers: list[subprocess.Popen] = []
        self._failure: str | None = None
        self._running = self._closed = False
        self.result_queue: MessageQueue | None = None  # set once rank 0 has replied
        self._tmpdir = tempfile.mkdtemp(prefix="ringserve-tp-")
        self._ctx = new_context()
        self._finalizer = weakref.finalize(self, _kill_workers, self.workers, self._tmpdir)
        try:
            self.broadcast = MessageQueue(
                n_reader=self.world_size, max_chunk_bytes=1 << 20, max_chunks=8
            )
            ready = self._start_workers(startup_timeout)
        except BaseException:
            self.shutdown()
            raise
        self.num_blocks = ready[0].num_blocks
        self.max_model_len = ready[0].max_model_len
        self.model_config: WorkerModelConfig = ready[0].model_config
        self.weight_bytes = [r.weight_bytes for r in ready]  # per rank
        self.kv_cache_bytes = [r.kv_cache_bytes for r in ready]
        self._running = True
        logger.info(
            "%d tensor-parallel workers: weights per rank %s MiB, KV cache per rank %s MiB",
            self.world_size,
            [round(b / 2**20, 1) for b in self.weight_bytes],
            [round(b / 2**20, 1) for b in self.kv_cache_bytes],
        )

    # ------------------------------------------------------------------ start-up

    def _start_workers(self, timeout: float) -> list[WorkerReady]:
        """Spawn the workers, hand each its handshake, and collect every rank's ready message."""
        port = _free_port()
        handle = msgspec.msgpack.encode(self.broadcast.export_handle())
        config_json = msgspec.json.encode(self.config)
        socks = []
        for rank in range(self.world_size):
            sock = self._ctx.socket(zmq.PAIR)
            sock.setsockopt(zmq.LINGER, 0)
            addr = f"ipc://{self._tmpdir}/worker-{rank}"
            sock.bind(addr)
            socks.append(sock)
            cmd = [sys.executable, "-m", "engine_core.worker", "--handshake", addr]
            cmd += ["--rank", str(rank), "--parent-pid", str(os.getpid())]
            self.workers.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))
        hellos = [
            msgspec.msgpack.encode(
                WorkerHandshake(
                    rank=rank,
                    config_json=config_json,
                    dist_init_method=f"tcp://127.0.0.1:{port}",
                    broadcast_queue=handle,
                )
            )
            for rank in range(self.world_size)
        ]
        try:
            replies = self._exchange(socks, hellos, time.monotonic() + timeout, timeout)
        finally:
            for sock in socks:
                sock.close()
        result_handle = msgspec.msgpack.decode(replies[0].result_queue, type=MessageQueueHandle)
        self.result_queue = MessageQueue.attach(result_handle, 0, msg_type=WorkerOutput)
        self.broadcast.wait_for_readers(timeout=60.0)
        shutil.rmtree(self._tmpdir, ignore_errors=True)  # the sockets are no longer needed
        ready = [r.ready for r in replies if r.ready is not None]
        assert len(ready) == self.world_size, "_exchange returns a ready reply per rank"
        blocks = {r.num_blocks for r in ready}
        if len(blocks) != 1:
            raise WorkerStartupError(f"the workers disagree on the KV cache size: {blocks}.")
        return ready

    def _exchange(
        self, socks: list[zmq.Socket], hellos: list[bytes], deadline: float, timeout: float
    ) -> list[WorkerHandshakeReply]:
        """Send each worker its handshake once it connects; gather the replies, or raise."""
        n = self.world_size
        sent = [False] * n
        replies: list[WorkerHandshakeReply | None] = [None] * n
        while not all(r is not None for r in replies):
            poller = zmq.Poller()
            for rank, sock in enumerate(socks):
                if not sent[rank]:
                    poller.register(sock, zmq.POLLOUT)  # a PAIR is writable once connected
                elif replies[rank] is None:
                    poller.register(sock, zmq.POLLIN)
            for sock, event in poller.poll(100):
                rank = socks.index(sock)
                if event & zmq.POLLOUT and not sent[rank]:
                    sock.send(hellos[rank])
                    sent[rank] = True
                elif event & zmq.POLLIN:
                    reply = msgspec.msgpack.decode(sock.recv(), type=WorkerHandshakeReply)
                    if reply.error is not None or reply.ready is None:
                        raise WorkerStartupError(
                            f"tensor-parallel worker rank {rank} failed to start: {reply.error}"
                        )
                    replies[rank] = reply
            for rank, proc in enumerate(self.workers):
                if replies[rank] is None and proc.poll() is not None:
                    raise WorkerStartupError(
                        f"tensor-parallel worker rank {rank} (pid {proc.pid}) "
                        f"{_exit_text(proc.returncode)} during start-up."
                    )
            if time.monotonic() > deadline:
                missing = [rank for rank in range(n) if replies[rank] is None]
                raise WorkerStartupError(
                    f"tensor-parallel workers {missing} did not start within {timeout:.0f} s."
                )
        return replies  # type: ignore[return-value]

    # ------------------------------------------------------------------ the step

    def warmup(self) -> None:
        """Every rank runs its warm-up forwards."""
        self._broadcast(WorkerWarmup())
        self._result()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        """Broadcast the step to every rank; rank 0's sampled tokens come back.

        A step with structured rows returns at once: the ranks run the forward while the
        EngineCore fills the bitmask, which sample_tokens then broadcasts.
        """
        self._broadcast(WorkerExecute(scheduler_output=scheduler_output))
        if scheduler_output.structured_req_ids:
            return None
        return self._runner_output()

    def sample_tokens(self, grammar_output: GrammarOutput | None) -> ModelRunnerOutput:
        """Broadcast the step's bitmask; rank 0 samples and its tokens come back."""
        assert grammar_output is not None, "only a step with structured rows waits to sample"
        self._broadcast(WorkerSample(grammar_output=grammar_output))
        return self._runner_output()

    def _runner_output(self) -> ModelRunnerOutput:
        out = self._result().runner_output
        if out is None:
            raise WorkerDiedError("tensor-parallel rank 0 returned no output for a step.")
        return out

    def check_health(self) -> None:
        """Raise WorkerDiedError if any worker has exited (called by an idle EngineCore)."""
        reason = self._death_message()
        if reason is not None:
            raise self._fail(reason)

    def _broadcast(self, msg: msgspec.Struct) -> None:
        if self._failure is not None:
            raise WorkerDiedError(self._failure)
        try:
            self.broadcast.enqueue(msg, timeout=_ENQUEUE_TIMEOUT_S)
        except (PeerDiedError, TimeoutError) as e:
            reason = self._death_message(_SETTLE_S) or f"cannot reach the workers: {e}"
            raise self._fail(reason) from e

    def _result(self) -> WorkerOutput:
        """Rank 0's answer, checking between waits that every worker is still alive."""
        assert self.result_queue is not None, "the workers have started"
        while True:
            try:
                out = self.result_queue.dequeue(timeout=_POLL_S)
            except TimeoutError:
                reason = self._death_message()
                if reason is not None:
                    raise self._fail(reason) from None
                continue
            except PeerDiedError as e:
                raise self._fail(self._death_message(_SETTLE_S) or str(e)) from e
            if out.error is None:
                return out
            # A rank killed mid-collective fails rank 0's step too: name the cause, not that.
            reason = self._death_message(_SETTLE_S, exclude_errors=True)
            raise self._fail(reason or f"tensor-parallel rank 0 failed the step: {out.error}")

    # ------------------------------------------------------------------ faults and shutdown

    def _death_message(self, settle_s: float = 0.0, exclude_errors: bool = False) -> str | None:
        """Which worker died and how (one killed by a signal first), or None if all live.

        settle_s: wait that long for a death (right after a failure, the cause may still be
        exiting); exclude_errors: only a death by a signal counts.
        """
        deadline = time.monotonic() + settle_s
        while True:
            dead = [(rank, p) for rank, p in enumerate(self.workers) if p.poll() is not None]
            if exclude_errors:
                dead = [(rank, p) for rank, p in dead if p.returncode < 0]
            if dead or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        if not dead:
            return None
        rank, proc = min(dead, key=lambda d: (d[1].returncode >= 0, d[0]))
        return f"tensor-parallel worker rank {rank} (pid {proc.pid}) {_exit_text(proc.returncode)}"

    def _fail(self, reason: str) -> WorkerDiedError:
        """Mark the executor dead and kill every worker (they cannot go on without a rank)."""
        if self._failure is None:
            self._failure = reason
            logger.error("%s: stopping every worker", reason)
            _kill_workers(self.workers)
        return WorkerDiedError(self._failure)

    def shutdown(self) -> None:
        """Stop every worker (politely when they are healthy) and release the queues."""
        if self._closed:
            return
        self._closed = True
        if self._running and self._failure is None:
            try:
                self.broadcast.enqueue(WorkerShutdown(), timeout=1.0)
                deadline = time.monotonic() + _SHUTDOWN_GRACE_S
                for proc in self.workers:
                    proc.wait(max(0.0, deadline - time.monotonic()))
            except (PeerDiedError, TimeoutError, subprocess.TimeoutExpired):
                pass
        _kill_workers(self.workers)
        for q in (self.result_queue, getattr(self, "broadcast", None)):
            if q is not None:
                q.close()
        self._ctx.destroy(linger=0)
        self._finalizer()


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for the group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_text(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _kill_workers(workers: list[subprocess.Popen], tmpdir: str | None = None) -> None:
    for proc in workers:
        if proc.poll() is None:
            proc.kill()
    for proc in workers:
        proc.wait()
    if tmpdir is not None:
        shutil.rmtree(tmpdir, ignore_errors=True)
