"""The reader half of MessageQueue: reading a chunk, spinning, sleeping, and watching the writer.

Sleeping is race-free because both sides fence between their store and their load: the reader
sets its sleeping flag, fences, then re-checks the ring; the writer publishes, fences, then
reads the sleeping flags. At least one of them sees the other's store, so either the reader
finds the message or the writer writes a byte to the reader's FIFO.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ipc import shm_ring
from ipc.shm_ring import H_CLOSED, H_WRITER_WAITING, TSO

LIVENESS_INTERVAL_S = 0.1  # how often a blocked side checks that its peer is still there
# With a pidfd, the writer's exit wakes a blocked reader at once: polling is only a safety net.
PIDFD_LIVENESS_INTERVAL_S = 1.0
_OVERFLOW_GRACE_S = 1.0  # how long a payload still in flight may trail its writer's exit
# The most a reader spins after recent traffic when its peer's pace asks for it (_adapt_spin).
MAX_SPIN_S = 1e-3

KIND_RAW, KIND_STRUCT, KIND_OVERFLOW = 0, 1, 2
EMPTY = object()


class PeerDiedError(RuntimeError):
    """The process on the other side of the queue is gone; `pid` names it."""

    def __init__(self, message: str, pid: int = 0) -> None:
        super().__init__(message)
        self.pid = pid


class PeerClosedError(PeerDiedError):
    """The other side closed the queue (and, for a reader, every message has been read)."""


def check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0
    ):
        raise ValueError(f"timeout must be None or a non-negative number, got {timeout!r}.")
    return timeout


class ReaderSide:
    """Reader methods of MessageQueue; state is set up by MessageQueue.attach."""

    # State and helpers MessageQueue sets up (attach); declared for the type checker.
    _acquire: Any
    _armed: Any
    _can_read: Any
    _closed: Any
    _copy_before_decode: Any
    _decoder: Any
    _fd: Any
    _fence: Any
    _flags: Any
    _header: Any
    _idx: Any
    _liveness_s: Any
    _meta: Any
    _n_read: Any
    _n_read_at_wait: Any
    _next: Any
    _next_liveness: Any
    _pidfd: Any
    _poller: Any
    _release: Any
    _shm_path: Any
    _sleeping: Any
    _slots: Any
    _sock_dir: Any
    _spin_s: Any
    _sub: Any
    _writer_fd: Any
    _writer_gone: Any
    _writer_pid: Any
    _writer_start: Any
    rank: Any

    def dequeue(self, timeout: float | None = None) -> Any:
        """The next message (a decoded Struct, or bytes for raw payloads), waiting at most
        `timeout` s (TimeoutError). Raises PeerDiedError / PeerClosedError once the writer is
        gone and every message it published has been read."""
        if not self._can_read:
            self._require_reader("dequeue")
        if timeout is not None:
            check_timeout(timeout)
        i = self._idx
        slot = self._slots[i]
        flags = self._flags
        if not flags[slot[0]] or flags[slot[1]]:
            return self._wait_read(timeout)
        if self._armed:  # a blocking reader wants no wake-ups while it keeps up
            self._disarm()
        return self._read_at(i, slot)

    def dequeue_nowait(self) -> Any:
        """The next message, or None if none is ready; never waits for an unsent message.

        Returning None arms fileno(): it turns readable when the next message is published.
        An event loop drains with this until None after each wake-up.
        """
        if not self._can_read:
            self._require_reader("dequeue_nowait")
        msg = self._read_one()
        if msg is not EMPTY:
            return msg
        self._arm()
        msg = self._read_one()
        if msg is not EMPTY:
            return msg
        if self._writer_gone or time.monotonic() >= self._next_liveness:
            self._check_writer()
        return None

    def fileno(self) -> int:
        """A file descriptor that is readable (level-triggered) when a message may be ready."""
        if not self._can_read:
            self._require_reader("fileno")
        return self._fd

    def _require_reader(self, what: str) -> None:
        if self._closed:
            raise ValueError(f"{what} on a closed MessageQueue.")
        raise TypeError(f"{what} is for readers; this is the writer.")

    def _read_one(self) -> Any:
        i = self._idx
        slot = self._slots[i]
        if not self._flags[slot[0]] or self._flags[slot[1]]:
            return EMPTY
        return self._read_at(i, slot)

    def _read_at(self, i: int, slot: tuple[int, int, memoryview]) -> Any:
        """Read chunk i, whose written flag we saw set and our read flag clear."""
        if not TSO:  # smp_rmb: the payload was written before the flag we just saw
            self._acquire()
            self._release()
        meta = self._meta[i]
        kind = meta & 0xFF
        try:
            if kind == KIND_STRUCT:
                view = slot[2][: meta >> 8]
                try:
                    msg = self._decoder.decode(bytes(view) if self._copy_before_decode else view)
                except BaseException:
                    view.release()  # the traceback would keep it, and the mapping, alive
                    raise
            elif kind == KIND_RAW:
                msg = slot[2][: meta >> 8].tobytes()
            else:
                msg = self._recv_overflow(kind)
        finally:
            # Consumed even if decoding failed, so that one bad message cannot wedge the ring.
            if not TSO:  # smp_mb: done with the payload before the writer may reuse the chunk
                self._acquire()
                self._release()
            self._flags[slot[1]] = 1
            self._idx = self._next[i]
            self._n_read += 1
            if self._header[H_WRITER_WAITING]:
                self._wake_writer()
        return msg

    def _wake_writer(self) -> None:
        try:
            os.write(self._writer_fd, b"\x00")
        except (BlockingIOError, BrokenPipeError):
            pass  # already readable, or the writer is gone

    def _recv_overflow(self, kind: int) -> Any:
        sub = self._sub
        # The writer sent the payload before publishing its marker: it is on its way, unless
        # the writer died before ZMQ flushed it.
        gone_since = None
        while not sub.poll(LIVENESS_INTERVAL_S * 1000):
            err = self._writer_state_error()
            if err is None:
                continue
            if gone_since is None:
                gone_since = time.monotonic()
            elif time.monotonic() - gone_since > _OVERFLOW_GRACE_S:
                raise type(err)(f"{err} An overflow payload it announced never arrived.", err.pid)
        if kind & KIND_STRUCT:
            frame = sub.recv(copy=False)
            return self._decoder.decode(frame.bytes if self._copy_before_decode else frame.buffer)
        return sub.recv()

    def _wait_read(self, timeout: float | None) -> Any:
        start = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        recent = self._n_read != self._n_read_at_wait
        self._n_read_at_wait = self._n_read
        if recent and self._spin_s > 0:
            # Traffic since the last wait: the next message is likely microseconds away.
            flags, slot = self._flags, self._slots[self._idx]
            w, mine = slot[0], slot[1]
            spin = self._spin_budget if timeout is None else min(self._spin_budget, timeout)
            end = start + spin
            while time.perf_counter() < end:
                if flags[w] and not flags[mine]:
                    if self._spin_budget != self._spin_s:  # grown: shrink it if the pace is up
                        self._adapt_spin(time.perf_counter() - start)
                    return self._read_at(self._idx, slot)
        try:
            while True:
                self._arm()
                msg = self._read_one()
                if msg is not EMPTY:
                    if recent and self._spin_s > 0:  # spin_s=0: never spin
                        self._adapt_spin(time.perf_counter() - start)
                    return msg
                now = time.monotonic()
                if self._writer_gone or now >= self._next_liveness:
                    self._check_writer()
                    if self._has_message():  # the writer is gone but left messages
                        continue
                if deadline is not None and now >= deadline:
                    raise TimeoutError(f"no message within {timeout} s (reader rank {self.rank}).")
                wait = self._next_liveness - now
                if deadline is not None:
                    wait = min(wait, deadline - now)
                if self._writer_gone:  # the FIFO reads EOF for ever: poll would spin
                    time.sleep(max(wait, 0.0))
                else:
                    self._note_events(self._poller.poll(max(wait, 0.0) * 1000 + 1))
        finally:
            self._disarm()

    def _adapt_spin(self, waited: float) -> None:
        """Spin next time about as long as this wait took, within [spin_s, MAX_SPIN_S].

        A peer that answers every few hundred µs (large payloads, a busy echo) then finds us
        still spinning instead of paying a FIFO wake-up (0.1-0.3 ms) each time; a wait longer
        than MAX_SPIN_S means the traffic paused, and the budget falls back to spin_s.
        """
        if waited > MAX_SPIN_S:
            self._spin_budget = self._spin_s
        else:
            self._spin_budget = max(self._spin_s, min(MAX_SPIN_S, 2 * waited))

    def _has_message(self) -> bool:
        slot = self._slots[self._idx]
        return bool(self._flags[slot[0]]) and not self._flags[slot[1]]

    def _arm(self) -> None:
        """Announce that we may sleep, after clearing wake-ups meant for earlier messages."""
        if not self._writer_gone:
            self._note_events(self._poller.poll(0))
        if not self._armed:
            self._sleeping[self.rank] = 1
            self._armed = True
        self._fence()

    def _disarm(self) -> None:
        if self._armed:
            self._sleeping[self.rank] = 0
            self._armed = False

    def _note_events(self, events: list[tuple[int, int]]) -> None:
        """Drain wake-up bytes from our FIFO; note the writer's exit if its pidfd fired."""
        for fd, _ in events:
            if fd == self._pidfd:
                self._writer_gone = True
            else:
                self._drain_wakeups()

    def _drain_wakeups(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            if not data:  # EOF: the writer closed its end, it closed or died
                self._writer_gone = True
                return
            if len(data) < 65536:
                return

    def _writer_state_error(self) -> PeerDiedError | None:
        pid = self._writer_pid
        if self._header[H_CLOSED]:
            return PeerClosedError(f"writer pid {pid} closed the queue.", pid)
        # EOF on our FIFO or a readable pidfd, without the closed flag: the writer's process
        # is exiting (its /proc entry can look alive for a moment after its files closed).
        if self._writer_gone or not shm_ring.pid_alive(pid, self._writer_start):
            # We may be the last one who knows: remove whatever names the writer left.
            shm_ring.remove_names(self._shm_path, self._sock_dir)
            return PeerDiedError(f"writer process {pid} died.", pid)
        return None

    def _check_writer(self) -> None:
        """Raise if the writer is gone and nothing it published is left to read."""
        self._next_liveness = time.monotonic() + self._liveness_s
        err = self._writer_state_error()
        if err is None:
            return
        self._fence()
        if self._has_message():
            return  # read what is left first
        raise err
