"""MessageQueue: one writer broadcasting messages to n readers through a shared-memory ring.

Small payloads travel in the ring; a payload larger than a chunk leaves an overflow marker
in the ring and goes, zero-copy, over a ZMQ XPUB socket (ipc://) that every reader receives
in the same order as the ring. A reader spins briefly after recent traffic, then sleeps on a
FIFO the writer writes one byte to only when the reader's sleeping flag is set; a writer
facing a full ring sleeps likewise on its own FIFO. See docs/architecture.md, "The
shared-memory ring", for the flag protocol.

Names: the segment (/dev/shm, 0600) and a private 0700 directory holding the socket and the
FIFOs. They are removed as soon as every reader has attached (the mappings and open files
live on), on close(), at exit and on SIGTERM; a watchdog process removes them if the creator
is killed before that, and a reader that finds the writer dead removes what is left.
Peer death: readers watch the writer through a pidfd and FIFO EOF (and /proc as a fallback);
the writer checks the pids of lagging readers while the ring is full.
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import Any

import msgspec
import zmq

from ipc import shm_ring
from ipc.reader import (
    LIVENESS_INTERVAL_S,
    PIDFD_LIVENESS_INTERVAL_S,
    PeerDiedError,
    ReaderSide,
)
from ipc.shm_ring import (
    H_CLOSED,
    H_WRITER_PID,
    H_WRITER_START,
    STATE_ATTACHED,
    STATE_CLOSED,
    Layout,
)
from ipc.writer import RANK_TOPIC, WriterSide
from ipc.zmq_context import new_context

DEFAULT_SPIN_S = 100e-6
_CLOSE_LINGER_MS = 2000  # how long close() waits for overflow payloads still in flight


class MessageQueueHandle(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """What a reader needs to attach: msgspec-encodable, sent to the reader process as bytes."""

    shm_path: str
    sock_dir: str
    n_reader: int
    max_chunk_bytes: int
    max_chunks: int
    writer_pid: int


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return value


def _check_spin(spin_s: object) -> float:
    if isinstance(spin_s, bool) or not isinstance(spin_s, (int, float)) or not spin_s >= 0:
        raise ValueError(f"spin_s must be a non-negative number of seconds, got {spin_s!r}.")
    return float(spin_s)


def _decodes_views(msg_type: Any) -> bool:
    """Whether decoding into msg_type keeps views into the input (Raw, memoryview fields)."""
    seen: set[int] = set()

    def walk(node: object) -> bool:
        if isinstance(node, (msgspec.inspect.RawType, msgspec.inspect.MemoryViewType)):
            return True
        if id(node) in seen:
            return False
        seen.add(id(node))
        if isinstance(node, (tuple, list)):
            return any(walk(x) for x in node)
        if isinstance(node, msgspec.inspect.Field):
            return walk(node.type)
        if isinstance(node, msgspec.inspect.Type):
            return any(walk(getattr(node, f)) for f in node.__struct_fields__)
        return False

    return walk(msgspec.inspect.type_info(msg_type))


def _open_pidfd(pid: int, start_time: int) -> int:
    """A pidfd for pid (readable once it exits), or -1 where the kernel has none."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return -1
    if shm_ring.proc_start_time(pid) != start_time:  # the pid was reused before we opened it
        os.close(fd)
        return -1
    return fd


class MessageQueue(WriterSide, ReaderSide):
    """A single-writer, multi-reader broadcast queue in shared memory.

    The creating process is the writer: `q = MessageQueue(n_reader)`, then sends
    `q.export_handle()` (msgspec-encodable) to the readers, which call
    `MessageQueue.attach(handle, rank, msg_type)`. The writer `enqueue()`s msgspec Structs or
    bytes-likes; every reader `dequeue()`s each of them, in order. `spin_s` is how long a
    waiting side spins before sleeping (0: never spin). Not thread-safe: one thread per side.
    """

    def __init__(
        self,
        n_reader: int,
        max_chunk_bytes: int = 1 << 20,
        max_chunks: int = 16,
        *,
        spin_s: float = DEFAULT_SPIN_S,
    ) -> None:
        self._layout = Layout(
            _check_positive("n_reader", n_reader),
            _check_positive("max_chunk_bytes", max_chunk_bytes),
            _check_positive("max_chunks", max_chunks),
        )
        self._spin_s = _check_spin(spin_s)
        self.is_writer, self.rank, self._closed, self._pid = True, -1, False, os.getpid()
        self._can_read = self._fast_write = False  # set once fully open
        self._names_removed, self._watchdog = False, None
        self._sock_dir = shm_ring.make_private_dir()
        self._shm_path = ""
        self._seg = self._pub = None
        self._ctx: zmq.Context | None = None
        self._init_fence()
        try:
            self._shm_path, self._seg = shm_ring.create_segment(self._layout)
            self._watchdog = shm_ring.start_watchdog(self._shm_path, self._sock_dir)
            self._init_writer()
        except BaseException:
            self._teardown_writer(linger_ms=0)
            raise
        shm_ring.register(self)

    def _init_writer(self) -> None:
        lay, seg = self._layout, self._seg
        header = seg.header
        header[shm_ring.H_N_READER] = lay.n_reader
        header[shm_ring.H_CHUNK_BYTES] = lay.max_chunk_bytes
        header[shm_ring.H_CHUNKS] = lay.max_chunks
        header[H_WRITER_PID] = os.getpid()
        header[H_WRITER_START] = shm_ring.proc_start_time(os.getpid())
        for rank in range(lay.n_reader):
            os.mkfifo(self._fifo_path(rank), 0o600)
        # Our wake-up FIFO. O_RDWR (Linux) so that it never reads EOF while no reader has it open.
        os.mkfifo(f"{self._sock_dir}/{shm_ring.WRITER_FIFO}", 0o600)
        self._writer_fd = os.open(
            f"{self._sock_dir}/{shm_ring.WRITER_FIFO}", os.O_RDWR | os.O_NONBLOCK
        )
        self._writer_poller = select.poll()
        self._writer_poller.register(self._writer_fd, select.POLLIN)
        self._ctx = new_context(io_threads=1)
        self._pub = self._ctx.socket(zmq.XPUB)
        self._pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every reader's subscription
        self._pub.setsockopt(zmq.SNDHWM, 0)  # never drop: the ring bounds what is in flight
        self._pub.setsockopt(zmq.LINGER, _CLOSE_LINGER_MS)
        self._pub.bind(f"ipc://{self._sock_dir}/overflow")
        self._init_common()
        stride = 1 + lay.n_reader
        self._reader_flags = [
            seg.extra_view(seg.flags[i * stride + 1 : (i + 1) * stride])
            for i in range(lay.max_chunks)
        ]
        # Per chunk, everything enqueue() needs, fetched with one subscript.
        self._slots = [
            (i * stride, self._reader_flags[i], seg.chunks[i]) for i in range(lay.max_chunks)
        ]
        self._zeros = bytes(lay.n_reader)
        self._ones = b"\x01" * lay.n_reader
        self._encoder = msgspec.msgpack.Encoder()
        self._buf = bytearray(256)
        self._struct_types: set[type] = set()
        self._subscribed: set[int] = set()
        self._wake_fds: list[int | None] = [None] * lay.n_reader
        self._all_attached = False
        self._header[H_CLOSED] = 0
        self._fence()
        self._header[shm_ring.H_MAGIC] = shm_ring.MAGIC  # last: a reader sees a complete header
        self._handle = MessageQueueHandle(
            self._shm_path, self._sock_dir, *self._layout_fields(), os.getpid()
        )

    def _layout_fields(self) -> tuple[int, int, int]:
        return self._layout.n_reader, self._layout.max_chunk_bytes, self._layout.max_chunks

    def _init_common(self) -> None:
        seg = self._seg
        self._flags, self._meta, self._chunks = seg.flags, seg.meta, seg.chunks
        self._header, self._states, self._sleeping = seg.header, seg.states, seg.sleeping
        self._n_chunks = n = self._layout.max_chunks
        self._next = [(i + 1) % n for i in range(n)]
        self._chunk_bytes = self._layout.max_chunk_bytes
        self._idx = 0

    def _init_fence(self) -> None:
        lock = threading.Lock()
        self._acquire, self._release = lock.acquire, lock.release

    def _fence(self) -> None:
        # Acquiring and releasing a lock is a full memory barrier in CPython.
        self._acquire()
        self._release()

    def _fifo_path(self, rank: int) -> str:
        return f"{self._sock_dir}/wake-{rank}"

    @classmethod
    def attach(
        cls,
        handle: MessageQueueHandle,
        rank: int,
        msg_type: Any = None,
        *,
        spin_s: float = DEFAULT_SPIN_S,
    ) -> MessageQueue:
        """Attach as reader `rank` to the queue `handle` names; msg_type decodes Struct payloads."""
        if not isinstance(handle, MessageQueueHandle):
            raise TypeError(f"handle must be a MessageQueueHandle, got {type(handle).__name__}.")
        self = cls.__new__(cls)
        self._init_reader(handle, rank, msg_type, _check_spin(spin_s))
        shm_ring.register(self)
        return self

    def _init_reader(self, handle: MessageQueueHandle, rank: int, msg_type: Any, spin_s: float):
        n = _check_positive("handle.n_reader", handle.n_reader)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < n:
            raise ValueError(f"rank must be an int in [0, {n}), got {rank!r}.")
        self._layout = Layout(n, handle.max_chunk_bytes, handle.max_chunks)
        self.is_writer, self.rank, self._closed, self._spin_s = False, rank, False, spin_s
        self._spin_budget = spin_s
        self._pid = os.getpid()
        self._can_read = self._fast_write = False
        self._shm_path, self._sock_dir, self._names_removed = handle.shm_path, handle.sock_dir, True
        self._seg = self._sub = None
        self._ctx = None
        self._fd = self._writer_fd = self._pidfd = -1
        self._init_fence()
        self._decoder = msgspec.msgpack.Decoder(msg_type if msg_type is not None else Any)
        self._copy_before_decode = msg_type is not None and _decodes_views(msg_type)
        try:
            self._open_reader(handle)
        except BaseException:
            self._teardown_reader()
            raise

    def _open_reader(self, handle: MessageQueueHandle) -> None:
        rank = self.rank
        try:
            self._seg = shm_ring.open_segment(handle.shm_path, self._layout)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"queue segment {handle.shm_path} does not exist: the writer closed it or died, "
                "or every reader had already attached."
            ) from None
        self._init_common()
        header = self._header
        if header[shm_ring.H_MAGIC] != shm_ring.MAGIC or tuple(header[1:4]) != (
            self._layout_fields()
        ):
            raise ValueError(f"segment {handle.shm_path} does not match its handle {handle}.")
        self._writer_pid, self._writer_start = header[H_WRITER_PID], header[H_WRITER_START]
        if not shm_ring.pid_alive(self._writer_pid, self._writer_start):
            shm_ring.remove_names(self._shm_path, self._sock_dir)
            raise PeerDiedError(f"writer process {self._writer_pid} is dead.", self._writer_pid)
        seg = self._seg
        if seg.states[rank] != shm_ring.STATE_NONE:
            # A rank that was here before has read part of the ring: it cannot start over.
            raise ValueError(f"rank {rank} is already attached (pid {seg.pids[rank]}).")
        self._fd = os.open(f"{handle.sock_dir}/wake-{rank}", os.O_RDONLY | os.O_NONBLOCK)
        self._writer_fd = os.open(
            f"{handle.sock_dir}/{shm_ring.WRITER_FIFO}", os.O_WRONLY | os.O_NONBLOCK
        )
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN)
        self._pidfd = _open_pidfd(self._writer_pid, self._writer_start)
        if self._pidfd >= 0:
            self._poller.register(self._pidfd, select.POLLIN)
        self._liveness_s = PIDFD_LIVENESS_INTERVAL_S if self._pidfd >= 0 else LIVENESS_INTERVAL_S
        self._ctx = new_context(io_threads=1)
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.RCVHWM, 0)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.connect(f"ipc://{handle.sock_dir}/overflow")
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.SUBSCRIBE, RANK_TOPIC + str(rank).encode())
        stride = 1 + self._layout.n_reader
        # Per chunk: its written flag, our read flag and its payload view.
        self._slots = [
            (i * stride, i * stride + 1 + rank, seg.chunks[i]) for i in range(self._n_chunks)
        ]
        self._armed, self._writer_gone, self._n_read, self._n_read_at_wait = True, False, 0, 0
        self._next_liveness = time.monotonic() + self._liveness_s
        seg.pids[rank] = os.getpid()
        seg.starts[rank] = shm_ring.proc_start_time(os.getpid())
        seg.sleeping[rank] = 1  # armed from the start, so fileno() works before any dequeue
        self._fence()
        seg.states[rank] = STATE_ATTACHED
        self._fence()
        self._can_read = True

    # ------------------------------------------------------------ both

    def _require_writer(self, what: str) -> None:
        if self._closed:
            raise ValueError(f"{what} on a closed MessageQueue.")
        if not self.is_writer:
            raise TypeError(f"{what} is for the writer; this is reader rank {self.rank}.")

    def _remove_names(self) -> None:
        if self.is_writer and not self._names_removed and os.getpid() == self._pid:
            self._names_removed = True
            shm_ring.remove_names(self._shm_path, self._sock_dir)
            shm_ring.release_watchdog(self._watchdog)

    def close(self) -> None:
        """Release everything; the writer also removes the names. Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._can_read = self._fast_write = False
        shm_ring.unregister(self)
        if os.getpid() != self._pid:
            return  # a forked copy: the queue and its names belong to the parent
        if self.is_writer:
            self._teardown_writer(_CLOSE_LINGER_MS)
        else:
            self._teardown_reader()

    def _teardown_writer(self, linger_ms: int) -> None:
        if self._pub is not None:
            self._pub.close(linger=linger_ms)  # flush overflow payloads before saying closed
        if self._ctx is not None:
            self._ctx.term()
        if self._seg is not None:
            self._seg.header[H_CLOSED] = 1
            self._fence()
            for rank in range(len(getattr(self, "_wake_fds", ()))):
                self._open_wake_fd(rank)  # so that every attached reader sees EOF
            for fd in getattr(self, "_wake_fds", ()):
                if fd is not None:
                    os.close(fd)  # a sleeping reader wakes up on EOF
            self._seg.close()
        if getattr(self, "_writer_fd", -1) >= 0:
            os.close(self._writer_fd)
            self._writer_fd = -1
        self._pub = self._ctx = self._seg = None
        self._closed, self._fast_write = True, False
        self._remove_names()

    def _teardown_reader(self) -> None:
        seg = self._seg
        if seg is not None and hasattr(self, "_slots"):
            seg.sleeping[self.rank] = 0
            seg.states[self.rank] = STATE_CLOSED
        if self._sub is not None:
            self._sub.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
        for fd in (self._fd, self._writer_fd, self._pidfd):
            if fd >= 0:
                os.close(fd)
        if seg is not None:
            seg.close()
        self._sub = self._ctx = self._seg = None
        self._fd = self._writer_fd = self._pidfd = -1
        self._closed, self._can_read = True, False

    def __enter__(self) -> MessageQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        role = "writer" if self.is_writer else f"reader {self.rank}"
        lay = self._layout
        return (
            f"MessageQueue({role}, n_reader={lay.n_reader}, max_chunk_bytes={lay.max_chunk_bytes},"
            f" max_chunks={lay.max_chunks}{', closed' if self._closed else ''})"
        )
