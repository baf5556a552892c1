"""The shared-memory segment behind a MessageQueue: layout, mapping, names and their cleanup.

One file in /dev/shm holds, in order: `max_chunks` chunks of `max_chunk_bytes`; the flag bytes,
`1 + n_reader` per chunk (written, then one read flag per reader); each chunk's payload length
and kind in one uint64 (`nbytes << 8 | kind`); a header; and a process table (pid, start time,
state and a sleeping flag per reader).
"""

from __future__ import annotations

import atexit
import mmap
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
from dataclasses import dataclass

# Memory ordering. x86-64 is TSO: stores are not reordered with stores, nor loads with loads
# or with later stores; only a store followed by a load of another location may pass it. So,
# as Linux's smp_wmb()/smp_rmb() there, the store->store and load->load/store fences of the
# ring protocol cost nothing there and we skip them (each is a lock round trip, ~0.1-0.2 us);
# the store->load fences (a writer publishing then reading the sleeping flags, a reader arming
# then re-checking) run everywhere. Elsewhere (aarch64...) every fence runs. The interpreter
# cannot reorder: each shared-memory access is its own opaque C call.
# RINGSERVE_IPC_FULL_FENCES=1 runs every fence anyway (the tests cover that path with it).
TSO = platform.machine().lower() in ("x86_64", "amd64") and os.environ.get(
    "RINGSERVE_IPC_FULL_FENCES", ""
) not in ("1", "true")

MAGIC = 0x52494E4753525631  # b"RINGSRV1"
SHM_DIR = "/dev/shm"
NAME_PREFIX = "ringserve-mq-"

# Header words (uint64).
(H_MAGIC, H_N_READER, H_CHUNK_BYTES, H_CHUNKS, H_WRITER_PID, H_WRITER_START, H_CLOSED,
 H_WRITER_WAITING) = range(8)  # fmt: skip
_HEADER_WORDS = 8
WRITER_FIFO = "wake-writer"  # readers write a byte here when the writer waits on a full ring

# Reader states in the process table.
STATE_NONE, STATE_ATTACHED, STATE_CLOSED = 0, 1, 2

_MAX_UNIX_PATH = 100  # sun_path is 108 bytes; keep a margin for the file names inside the dir


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True, slots=True)
class Layout:
    """Byte offsets of every region of the segment, computed the same way by both sides."""

    n_reader: int
    max_chunk_bytes: int
    max_chunks: int

    @property
    def flags_off(self) -> int:
        return self.max_chunks * self.max_chunk_bytes

    @property
    def meta_off(self) -> int:
        return _align(self.flags_off + self.max_chunks * (1 + self.n_reader), 8)

    @property
    def header_off(self) -> int:
        return self.meta_off + 8 * self.max_chunks

    @property
    def pids_off(self) -> int:
        return self.header_off + 8 * _HEADER_WORDS

    @property
    def starts_off(self) -> int:
        return self.pids_off + 8 * self.n_reader

    @property
    def states_off(self) -> int:
        return self.starts_off + 8 * self.n_reader

    @property
    def sleeping_off(self) -> int:
        return self.states_off + self.n_reader

    @property
    def size(self) -> int:
        return _align(self.sleeping_off + self.n_reader, mmap.PAGESIZE)


class Segment:
    """A mapped segment with a memoryview per region; `close()` releases views, then the map."""

    def __init__(self, fd: int, layout: Layout) -> None:
        self.layout = layout
        self._mmap = mmap.mmap(fd, layout.size)
        base = memoryview(self._mmap)
        n, lay = layout.n_reader, layout

        def region(off: int, length: int, fmt: str = "B") -> memoryview:
            view = base[off : off + length]
            return view if fmt == "B" else view.cast(fmt)  # type: ignore[call-overload]

        cb = lay.max_chunk_bytes
        self.chunks = [region(i * cb, cb) for i in range(lay.max_chunks)]
        self.flags = region(lay.flags_off, lay.max_chunks * (1 + n))
        self.meta = region(lay.meta_off, 8 * lay.max_chunks, "Q")
        self.header = region(lay.header_off, 8 * _HEADER_WORDS, "Q")
        self.pids = region(lay.pids_off, 8 * n, "Q")
        self.starts = region(lay.starts_off, 8 * n, "Q")
        self.states = region(lay.states_off, n)
        self.sleeping = region(lay.sleeping_off, n)
        self._views = [base, *self.chunks, self.flags, self.meta, self.header]
        self._views += [self.pids, self.starts, self.states, self.sleeping]

    def extra_view(self, view: memoryview) -> memoryview:
        """Track a view derived from a region so that close() releases it too."""
        self._views.append(view)
        return view

    def close(self) -> None:
        for view in reversed(self._views):
            view.release()
        self._views.clear()
        self._mmap.close()


def create_segment(layout: Layout) -> tuple[str, Segment]:
    """Create an owner-only /dev/shm file of the layout's size and map it."""
    path = f"{SHM_DIR}/{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        try:
            # Reserve the pages now: a full /dev/shm then fails here, not with SIGBUS later.
            os.posix_fallocate(fd, 0, layout.size)
        except OSError as e:
            raise OSError(e.errno, f"cannot reserve {layout.size} bytes in {SHM_DIR}: {e}") from e
        return path, Segment(fd, layout)
    except BaseException:
        unlink_quietly(path)
        raise
    finally:
        os.close(fd)


def open_segment(path: str, layout: Layout) -> Segment:
    """Map an existing segment; the file must be exactly the layout's size."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size != layout.size:
            raise ValueError(f"segment {path} is {size} bytes, the handle implies {layout.size}.")
        return Segment(fd, layout)
    finally:
        os.close(fd)


def make_private_dir() -> str:
    """A fresh 0700 directory for the queue's socket and FIFOs, short enough for AF_UNIX."""
    prefix = f"{NAME_PREFIX}{os.getpid()}-"
    base = tempfile.gettempdir()
    if len(base) + len(prefix) + 12 > _MAX_UNIX_PATH:
        base = "/tmp"
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_names(shm_path: str, sock_dir: str) -> None:
    """Remove the segment's name and the private directory with everything in it."""
    unlink_quietly(shm_path)
    try:
        for name in os.listdir(sock_dir):
            unlink_quietly(os.path.join(sock_dir, name))
        os.rmdir(sock_dir)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- liveness


def proc_start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (0 if unknown); guards against pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return 0


def pid_alive(pid: int, start_time: int) -> bool:
    """Whether `pid` is the same process as when recorded and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to a signal-0 probe
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    if fields[0] in (b"Z", b"X"):
        return False
    return not start_time or int(fields[19]) == start_time


# ---------------------------------------------------------------- cleanup after the creator dies

# Runs in a tiny separate process: waits until the creator's end of its stdin pipe is closed
# (the creator released it, exited or was killed), then removes the names. Uses only os so
# that it starts in milliseconds.
_WATCHDOG = """
import os, sys
try:
    while os.read(0, 4096):
        pass
except BaseException:
    pass
shm, d = sys.argv[1], sys.argv[2]
try:
    os.unlink(shm)
except OSError:
    pass
try:
    for n in os.listdir(d):
        try:
            os.unlink(os.path.join(d, n))
        except OSError:
            pass
    os.rmdir(d)
except OSError:
    pass
"""


def start_watchdog(shm_path: str, sock_dir: str) -> subprocess.Popen:
    """A process that removes the names once the creator is gone, even after SIGKILL."""
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _WATCHDOG, shm_path, sock_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a signal to the creator's process group must not take it along
    )


def release_watchdog(proc: subprocess.Popen | None) -> None:
    """Let the watchdog finish: closing its stdin makes it remove (already removed) names and exit."""
    if proc is None or proc.stdin is None or proc.stdin.closed:
        return
    proc.stdin.close()
    # Reap it off the caller's path: it needs a few milliseconds to start and exit.
    threading.Thread(target=proc.wait, name="ringserve-watchdog-reaper", daemon=True).start()


# ---------------------------------------------------------------- process-exit cleanup

_open_queues: weakref.WeakSet = weakref.WeakSet()
_sigterm_installed = False


def register(queue: object) -> None:
    """Close `queue` at interpreter exit, and remove its names on SIGTERM."""
    global _sigterm_installed
    _open_queues.add(queue)
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    # Only take SIGTERM over when nobody else handles it; uvicorn and friends install their own
    # and then exit through atexit, which closes the queue.
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
        _sigterm_installed = True


def unregister(queue: object) -> None:
    _open_queues.discard(queue)


def _on_sigterm(signum: int, frame: object) -> None:
    for queue in list(_open_queues):
        queue._remove_names()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


@atexit.register
def _close_all() -> None:
    for queue in list(_open_queues):
        try:
            queue.close()
        except Exception:  # noqa: BLE001 - best effort at exit, the names go regardless
            queue._remove_names()
