"""ZMQ contexts whose background threads never take a process-directed signal."""

from __future__ import annotations

import signal

import zmq


def new_context(io_threads: int = 1) -> zmq.Context:
    """A zmq.Context with its I/O and reaper threads already started, all signals blocked in them.

    libzmq blocks signals in its threads itself, but only once each thread first runs. A signal
    sent in between (a SIGTERM right after start-up, on a loaded machine) can land in such a
    thread: Python's C handler then only sets a flag, and a main thread blocked in a read never
    runs the Python handler. Started here with every signal blocked, the threads inherit the
    full mask from birth, so the kernel always delivers to a thread that can act on it.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        ctx = zmq.Context(io_threads=io_threads)
        ctx.socket(zmq.PAIR).close(linger=0)  # libzmq starts its threads with the first socket
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return ctx
