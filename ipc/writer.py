"""The writer half of MessageQueue: publishing, back-pressure, overflow and waking readers.

Publishing a chunk follows docs/architecture.md: wait until it is writable, clear *written*,
write the payload, reset every reader's flag, fence, set *written*, fence. The reset comes
before *written* so that no reader ever sees a false "partly read" state. The first fence
orders stores with stores, which x86-64 does by itself: see shm_ring.TSO.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec
import zmq

from ipc import shm_ring
from ipc.reader import (
    KIND_OVERFLOW,
    KIND_RAW,
    KIND_STRUCT,
    LIVENESS_INTERVAL_S,
    PeerClosedError,
    PeerDiedError,
    check_timeout,
)
from ipc.shm_ring import H_WRITER_WAITING, STATE_ATTACHED, STATE_CLOSED, TSO

RANK_TOPIC = b"\xffringserve-rank:"  # each reader also subscribes to this + its rank


class WriterSide:
    """Writer methods of MessageQueue; state is set up by MessageQueue.__init__."""

    # State and helpers MessageQueue sets up (__init__); declared for the type checker.
    _acquire: Any
    _all_attached: Any
    _buf: Any
    _chunk_bytes: Any
    _encoder: Any
    _fence: Any
    _flags: Any
    _handle: Any
    _header: Any
    _idx: Any
    _layout: Any
    _meta: Any
    _names_removed: Any
    _next: Any
    _ones: Any
    _pub: Any
    _reader_flags: Any
    _release: Any
    _remove_names: Any
    _require_writer: Any
    _seg: Any
    _sleeping: Any
    _slots: Any
    _sock_dir: Any
    _spin_s: Any
    _states: Any
    _struct_types: Any
    _subscribed: Any
    _wake_fds: Any
    _writer_fd: Any
    _writer_poller: Any
    _zeros: Any

    def export_handle(self) -> Any:
        """The handle readers attach with: a msgspec Struct (writer only)."""
        self._require_writer("export_handle")
        return self._handle

    def wait_for_readers(self, timeout: float | None = None) -> None:
        """Block until all n_reader readers have attached; TimeoutError names the missing ranks."""
        self._require_writer("wait_for_readers")
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._poll_readers():
            if deadline is not None and time.monotonic() >= deadline:
                missing = [r for r in range(self._layout.n_reader) if not self._reader_ready(r)]
                raise TimeoutError(f"readers {missing} did not attach within {timeout} s.")
            self._pub.poll(10)  # a subscription arriving ends the wait early

    def _reader_ready(self, rank: int) -> bool:
        return self._states[rank] != 0 and rank in self._subscribed

    def _poll_readers(self) -> bool:
        """Collect subscriptions; once every reader is in, open the FIFOs and drop the names."""
        if self._all_attached:
            return True
        while True:
            try:
                msg = self._pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if msg[:1] == b"\x01" and msg[1:].startswith(RANK_TOPIC):
                self._subscribed.add(int(msg[1 + len(RANK_TOPIC) :]))
        if not all(self._reader_ready(r) for r in range(self._layout.n_reader)):
            return False
        for rank in range(self._layout.n_reader):
            self._open_wake_fd(rank)
        # Every mapping, FIFO and connection is open: the names are no longer needed.
        self._remove_names()
        self._all_attached = self._fast_write = True
        return True

    def _open_wake_fd(self, rank: int) -> int | None:
        if self._wake_fds[rank] is None and not self._names_removed:
            try:
                path = f"{self._sock_dir}/wake-{rank}"
                self._wake_fds[rank] = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: the reader is not (or no longer) there
                pass
        return self._wake_fds[rank]

    def enqueue(self, obj: Any, timeout: float | None = None) -> None:
        """Publish obj (a msgspec.Struct, or bytes-like sent raw) to every reader.

        A full ring waits at most `timeout` s for the slowest reader (TimeoutError), and raises
        PeerDiedError if a reader that has not read the oldest message is dead or closed.
        """
        if not self._fast_write:  # closed, a reader, or some readers not attached yet
            self._require_writer("enqueue")
            self._poll_readers()
        if timeout is not None:
            check_timeout(timeout)
        t = type(obj)
        if t in self._struct_types:
            buf = self._buf
            self._encoder.encode_into(obj, buf)
            data, kind, n = buf, KIND_STRUCT, len(buf)
        elif t is bytes:
            data, kind, n = obj, KIND_RAW, len(obj)
        else:
            data, kind, n = self._classify(obj)
        i = self._idx
        w, rflags, chunk = self._slots[i]
        flags = self._flags
        if flags[w] and rflags != self._ones:
            self._wait_writable(i, timeout)
        flags[w] = 0
        if n <= self._chunk_bytes:
            chunk[:n] = data
        else:
            self._send_overflow(data, timeout)
            kind |= KIND_OVERFLOW
        self._meta[i] = n << 8 | kind
        rflags[:] = self._zeros
        if not TSO:  # smp_wmb: the payload and the reset flags before *written*
            self._acquire()
            self._release()
        flags[w] = 1
        self._acquire()  # smp_mb: *written* before we read the sleeping flags
        self._release()
        self._idx = self._next[i]
        if self._sleeping != self._zeros:
            self._wake_sleepers()

    def _classify(self, obj: Any) -> tuple[Any, int, int]:
        """(data, kind, nbytes) for anything but bytes and Struct types seen before."""
        if isinstance(obj, msgspec.Struct):
            self._struct_types.add(type(obj))
            self._encoder.encode_into(obj, self._buf)
            return self._buf, KIND_STRUCT, len(self._buf)
        if isinstance(obj, (bytes, bytearray)):
            return obj, KIND_RAW, len(obj)
        if isinstance(obj, memoryview):
            if not (obj.format == "B" and obj.ndim == 1 and obj.contiguous):
                try:
                    obj = obj.cast("B")
                except TypeError as e:
                    raise ValueError(f"enqueue needs a C-contiguous memoryview: {e}") from None
            return obj, KIND_RAW, obj.nbytes
        raise TypeError(
            f"enqueue takes a msgspec.Struct or bytes/bytearray/memoryview, got {type(obj).__name__}."
        )

    def _send_overflow(self, data: Any, timeout: float | None) -> None:
        if not self._all_attached:
            # A reader not yet subscribed would miss the payload: wait for all of them.
            self.wait_for_readers(timeout)
        if data is self._buf:
            # Hand the encoded bytes to ZMQ (zero-copy) and encode the next message elsewhere.
            self._pub.send(data, copy=False)
            self._buf = bytearray(256)
        elif type(data) is bytes or (isinstance(data, memoryview) and data.readonly):
            self._pub.send(data, copy=False)
        else:
            self._pub.send(data, copy=True)  # the caller may reuse a mutable buffer at once

    def _wait_writable(self, i: int, timeout: float | None) -> None:
        """Back-pressure: spin briefly, then sleep until a reader frees the chunk.

        Readers write to our FIFO when they read while our waiting flag is set. They do not
        fence between their read flag and that check (it would cost every message a fence),
        so a wake-up can be missed, rarely; a poll timeout of 1 to 5 ms bounds what that costs.
        """
        flags, (w, rflags, _), ones = self._flags, self._slots[i], self._ones
        spin = self._spin_s if timeout is None else min(self._spin_s, timeout)
        end = time.perf_counter() + spin
        while time.perf_counter() < end:
            if not flags[w] or rflags == ones:
                return
        deadline = None if timeout is None else time.monotonic() + timeout - spin
        next_check, backstop = time.monotonic(), 1e-3
        try:
            while True:
                if self._writer_poller.poll(0):
                    os.read(self._writer_fd, 65536)  # wake-ups for chunks already freed
                self._header[H_WRITER_WAITING] = 1
                self._fence()
                if not flags[w] or rflags == ones:
                    return
                now = time.monotonic()
                if now >= next_check:
                    self._check_readers(i)
                    next_check = now + LIVENESS_INTERVAL_S
                if deadline is not None and now >= deadline:
                    lagging = [r for r in range(self._layout.n_reader) if not rflags[r]]
                    raise TimeoutError(
                        f"ring full: readers {lagging} did not read within {timeout} s."
                    )
                wait = min(backstop, next_check - now)
                if deadline is not None:
                    wait = min(wait, deadline - now)
                self._writer_poller.poll(max(wait, 0.0) * 1000 + 0.5)
                backstop = min(backstop * 2, 5e-3)
        finally:
            self._header[H_WRITER_WAITING] = 0

    def _check_readers(self, i: int) -> None:
        """Raise if a reader that still has to read chunk i is dead or closed."""
        seg = self._seg
        for rank in range(self._layout.n_reader):
            if self._reader_flags[i][rank]:
                continue
            state, pid = seg.states[rank], seg.pids[rank]
            if state == STATE_CLOSED:
                raise PeerClosedError(f"reader rank {rank} (pid {pid}) closed the queue.", pid)
            if state == STATE_ATTACHED and not shm_ring.pid_alive(pid, seg.starts[rank]):
                raise PeerDiedError(f"reader rank {rank} (pid {pid}) died.", pid)

    def _wake_sleepers(self) -> None:
        for rank in range(self._layout.n_reader):
            if self._sleeping[rank]:
                fd = self._open_wake_fd(rank)
                if fd is None:
                    continue
                try:
                    os.write(fd, b"\x00")
                except (BlockingIOError, BrokenPipeError):
                    pass  # already readable, or the reader is gone (liveness reports it)
