"""ZMQ contexts from ipc.new_context: their threads never take a signal meant for the process."""

from __future__ import annotations

import os
import signal

import zmq

from ipc import new_context, zmq_context


def _zmq_thread_masks() -> dict[str, int]:
    """Each libzmq background thread of this process -> its blocked-signal mask."""
    masks = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            name = f.read().strip()
        if name.startswith("ZMQbg"):
            with open(f"/proc/self/task/{tid}/status") as f:
                line = next(ln for ln in f if ln.startswith("SigBlk:"))
            masks[f"{name}/{tid}"] = int(line.split()[1], 16)
    return masks


def test_threads_start_with_every_signal_blocked_and_the_caller_keeps_its_mask(monkeypatch):
    # libzmq starts its threads with the first socket, and they inherit the caller's mask:
    # that mask must block the signals then (libzmq's own blocking comes only once each
    # thread first runs, which a loaded machine can delay past a SIGTERM).
    masks_at_first_socket = []

    class Recording(zmq.Context):
        def socket(self, *args, **kwargs):
            masks_at_first_socket.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
            return super().socket(*args, **kwargs)

    monkeypatch.setattr(zmq_context.zmq, "Context", Recording)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    seen = set(_zmq_thread_masks())
    ctx = new_context()
    try:
        assert masks_at_first_socket, "new_context must start the threads itself"
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            assert sig in masks_at_first_socket[0]
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
        threads = {k: v for k, v in _zmq_thread_masks().items() if k not in seen}
        assert threads, "no new libzmq thread"
        for name, mask in threads.items():
            assert mask & (1 << (signal.SIGTERM - 1)), f"{name} can take SIGTERM"
    finally:
        ctx.term()
