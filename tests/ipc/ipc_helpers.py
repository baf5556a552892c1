"""Helpers for the ipc tests: peer processes running tests/ipc/ipc_peer.py, and leak checks."""

from __future__ import annotations

import glob
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest

from ipc import MessageQueueHandle

HERE = Path(__file__).parent
REPO = HERE.parent.parent
PEER = str(HERE / "ipc_peer.py")


class Peer:
    """A running ipc_peer.py process; its stdout lines arrive as dicts through `next()`."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        self.proc = subprocess.Popen(
            [sys.executable, PEER, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.pid = self.proc.pid
        self._lines: queue.Queue = queue.Queue()
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(json.loads(line))
        self._lines.put(None)

    def next(self, timeout: float = 30.0) -> dict:
        """The next line the peer printed; fails the test if it exits or stays silent."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"peer {self.pid} printed nothing within {timeout} s")
        if line is None:
            pytest.fail(f"peer {self.pid} exited (code {self.proc.wait()}) without output")
        return line

    def send(self, **cmd: object) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)


class Peers:
    """Starts peers for one test and kills whatever is left at its end."""

    def __init__(self) -> None:
        self.started: list[Peer] = []

    def reader(self, handle: MessageQueueHandle, rank: int = 0, *extra: str) -> Peer:
        h = msgspec.json.encode(handle).decode()
        peer = Peer("reader", "--handle", h, "--rank", str(rank), *extra)
        self.started.append(peer)
        return peer

    def attached_readers(self, handle: MessageQueueHandle, *extra: str) -> list[Peer]:
        readers = [self.reader(handle, rank, *extra) for rank in range(handle.n_reader)]
        for peer in readers:
            assert "attached" in peer.next()
        return readers

    def writer(self, n_reader: int = 1, chunk_bytes: int = 1024, chunks: int = 4) -> Peer:
        peer = Peer(
            "writer", "--n-reader", str(n_reader), "--chunk-bytes", str(chunk_bytes),
            "--chunks", str(chunks),
        )  # fmt: skip
        self.started.append(peer)
        return peer

    def stop_all(self) -> None:
        for peer in self.started:
            peer.kill()
        for peer in self.started:
            peer.proc.wait(10)
            peer._pump_thread.join(10)
            peer.proc.stdin.close()
            peer.proc.stdout.close()


def our_names(pids: set[int]) -> list[str]:
    """Queue names (segment files, private dirs) created by any of `pids`."""
    found = glob.glob("/dev/shm/ringserve-mq-*") + glob.glob("/tmp/ringserve-mq-*")
    return [p for p in found if int(os.path.basename(p).split("-")[2]) in pids]


def wait_until_gone(paths: list[str], timeout: float = 5.0) -> list[str]:
    """Paths still present after up to `timeout` s (watchdogs need a moment after a kill)."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in paths if os.path.exists(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def handle_of(peer: Peer) -> MessageQueueHandle:
    return msgspec.json.decode(peer.next()["handle"], type=MessageQueueHandle)
