"""EngineCoreClient: starts the EngineCore process and talks to it through two MessageQueues."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref

import msgspec
import zmq

from engine_core.config import EngineConfig
from engine_core.protocol import (
    AbortRequests,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineHandshake,
    EngineHandshakeReply,
    EngineReady,
    UtilityRequest,
)
from ipc import MessageQueue, MessageQueueHandle, PeerDiedError, new_context

logger = logging.getLogger("ringserve.frontend")


class EngineDeadError(RuntimeError):
    """The EngineCore process is gone; every request in flight has failed."""


class EngineStartupError(RuntimeError):
    """The EngineCore process failed to start; the message carries its reason."""


class EngineCoreClient:
    """The frontend's handle on one EngineCore process (sync; the async layer wraps it)."""

    def __init__(
        self, config: EngineConfig, startup_timeout: float = 300.0, *, wait: bool = True
    ) -> None:
        """Spawn the EngineCore and, unless wait=False, finish its start (wait_ready()).

        Spawn on a thread that outlives the core: its parent-death signal follows the
        thread that started it (frontend/startup.py spawns on the main thread, then waits
        for the handshake on another).
        """
        self.config = config
        self._lock = threading.Lock()  # enqueue from several threads (the loop, executors)
        self._closed = False
        self._dead_reason: str | None = None
        self.output_queue: MessageQueue | None = None
        self._tmpdir = tempfile.mkdtemp(prefix="ringserve-")
        self.input_queue = MessageQueue(n_reader=1, max_chunk_bytes=1 << 20, max_chunks=16)
        self._ctx = new_context()
        sock = self._ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        addr = f"ipc://{self._tmpdir}/handshake"
        sock.bind(addr)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine_core", "--handshake", addr],
            stdin=subprocess.DEVNULL,
            # Its own session: a signal to our process group (Ctrl-C, `timeout`, systemd) must
            # not stop the core while we drain; it follows us through PDEATHSIG and shutdown().
            start_new_session=True,
        )
        self._pidfd: int | None = None
        self._finalizer = weakref.finalize(self, _cleanup, self.proc, self._tmpdir)
        atexit.register(self.shutdown)
        self._handshake_sock: zmq.Socket | None = sock
        self._startup_timeout = startup_timeout
        self.ready: EngineReady
        if wait:
            self.wait_ready()

    def wait_ready(self) -> EngineCoreClient:
        """Send the core its configuration and wait for it to be ready (EngineStartupError if
        it fails or times out, after shutting it down); returns self."""
        sock, self._handshake_sock = self._handshake_sock, None
        assert sock is not None, "wait_ready() runs once"
        try:
            self.ready = self._handshake(sock, self._startup_timeout)
        except BaseException:
            sock.close()
            self.shutdown()
            raise
        sock.close()
        return self

    def _handshake(self, sock: zmq.Socket, timeout: float) -> EngineReady:
        hello = EngineHandshake(
            config_json=msgspec.json.encode(self.config),
            input_queue=msgspec.msgpack.encode(self.input_queue.export_handle()),
        )
        sock.send(msgspec.msgpack.encode(hello))
        deadline = time.monotonic() + timeout
        while not sock.poll(100):
            if self.proc.poll() is not None:
                raise EngineStartupError(
                    f"the engine core process exited with code {self.proc.returncode} during start-up"
                )
            if time.monotonic() > deadline:
                raise EngineStartupError(f"the engine core did not start within {timeout:.0f} s")
        reply = msgspec.msgpack.decode(sock.recv(), type=EngineHandshakeReply)
        if reply.error is not None or reply.ready is None:
            raise EngineStartupError(f"the engine core failed to start: {reply.error}")
        handle = msgspec.msgpack.decode(reply.output_queue, type=MessageQueueHandle)
        self.output_queue = MessageQueue.attach(handle, 0, msg_type=EngineCoreOutputs)
        self.input_queue.wait_for_readers(timeout=max(1.0, deadline - time.monotonic()))
        return reply.ready

    # ---------------------------------------------------------------- input side

    def _send(self, msg: msgspec.Struct) -> None:
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_reason)
        try:
            with self._lock:
                self.input_queue.enqueue(msg, timeout=30.0)
        except (PeerDiedError, TimeoutError) as e:
            raise self._mark_dead(f"cannot reach the engine core: {e}") from e

    def add_request(self, req: EngineCoreRequest) -> None:
        self._send(req)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids and self._dead_reason is None:
            self._send(AbortRequests(request_ids=list(request_ids)))

    def call_utility_nowait(self, call_id: int, method: str) -> None:
        self._send(UtilityRequest(call_id=call_id, method=method))

    # ---------------------------------------------------------------- output side

    def get_outputs(self, timeout: float | None = None) -> EngineCoreOutputs:
        """Block for the next message; raises TimeoutError, or EngineDeadError if the core died."""
        assert self.output_queue is not None, "the client has started"
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic()))
            try:
                out = self.output_queue.dequeue(timeout=wait)
            except TimeoutError:
                if not self.is_alive():
                    raise self._mark_dead(self._exit_message()) from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                continue
            except PeerDiedError as e:
                raise self._mark_dead(self._exit_message()) from e
            return self._check(out)

    def get_outputs_nowait(self) -> EngineCoreOutputs | None:
        assert self.output_queue is not None, "the client has started"
        try:
            out = self.output_queue.dequeue_nowait()
        except PeerDiedError as e:
            raise self._mark_dead(self._exit_message()) from e
        return None if out is None else self._check(out)

    def _check(self, out: EngineCoreOutputs) -> EngineCoreOutputs:
        if out.engine_dead is not None:
            raise self._mark_dead(f"the engine core failed: {out.engine_dead}")
        return out

    def output_fileno(self) -> int:
        assert self.output_queue is not None, "the client has started"
        return self.output_queue.fileno()

    def process_sentinel_fd(self) -> int:
        """A pidfd that turns readable when the core exits (for loop.add_reader)."""
        if self._pidfd is None:
            self._pidfd = os.pidfd_open(self.proc.pid)
        return self._pidfd

    # ---------------------------------------------------------------- lifetime

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def exit_reason(self) -> str | None:
        return self._dead_reason

    def _exit_message(self) -> str:
        try:  # the queue can notice the death a moment before waitpid can
            code = self.proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            return "the engine core stopped answering"
        if code < 0:
            return f"the engine core process was killed by {signal.Signals(-code).name}"
        return f"the engine core process exited with code {code}"

    def _mark_dead(self, reason: str) -> EngineDeadError:
        if self._dead_reason is None:
            self._dead_reason = reason
            logger.error("%s", reason)
        return EngineDeadError(self._dead_reason)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the core (SIGTERM, then SIGKILL) and release every queue; idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        if self._dead_reason is None:
            self._dead_reason = "the engine was shut down"
        _stop_process(self.proc, timeout)
        for q in (self.input_queue, self.output_queue):
            if q is not None:
                q.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self._ctx.destroy(linger=0)
        self._finalizer()


def _stop_process(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cleanup(proc: subprocess.Popen, tmpdir: str) -> None:
    _stop_process(proc, 5.0)
    shutil.rmtree(tmpdir, ignore_errors=True)
