"""Start-up shared by the engine's child processes (the EngineCore and its TP workers).

Each is started by its parent with a ZMQ address: it arms the parent-death signal, leaves
Ctrl-C to the frontend, logs to stderr under its own name, connects a PAIR socket to the
address for its handshake, and answers a failed start-up with an error reply instead of a
silent exit. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import signal
import sys
import traceback

import msgspec
import zmq

from ipc import new_context

logger = logging.getLogger("ringserve.process")


def set_parent_death_signal(sig: signal.Signals) -> None:
    """Ask Linux to send `sig` when our parent dies, so that no child process outlives it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, sig)
    except (OSError, AttributeError):
        pass


def start_child_process(log_name: str, death_signal: signal.Signals) -> None:
    """Die with the parent (by `death_signal`), ignore SIGINT, log to stderr as `log_name`.

    Ctrl-C in a terminal reaches the whole process group: the frontend decides when we stop.
    """
    set_parent_death_signal(death_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {log_name} %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def connect_handshake(addr: str) -> tuple[zmq.Context, zmq.Socket]:
    """A ZMQ context and a PAIR socket connected to the parent's handshake address."""
    ctx = new_context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 1000)  # a last reply still leaves after close()
    sock.connect(addr)
    return ctx, sock


def reply_startup_error(sock: zmq.Socket, reply: type[msgspec.Struct], exc: BaseException) -> None:
    """Log a failed start-up and send the parent `reply(error="Type: message")`."""
    logger.error("start-up failed: %s", traceback.format_exc())
    sock.send(msgspec.msgpack.encode(reply(error=f"{type(exc).__name__}: {exc}")))
