"""Fixtures for the router's tests: `python -m router` and small fake backends as real
processes on loopback, all stopped (and checked for leaks) when a test is done."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from tests.procs import child_pids, pid_alive

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE = os.path.join(REPO, "tests", "router", "fake_backend.py")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Proc:
    """A child process with its log in a file; wait_ready() polls /health."""

    def __init__(self, cmd: list[str], host: str, port: int) -> None:
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self.log_path = tempfile.mktemp(prefix="ringserve-router-test-", suffix=".log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0, path: str = "/health") -> Proc:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"{self.proc.args} exited {self.proc.returncode}:\n{self.log()[-3000:]}"
                )
            try:
                if httpx.get(self.url + path, timeout=2.0).status_code < 500:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        pytest.fail(f"not ready within {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def pids(self) -> list[int]:
        return [self.proc.pid, *child_pids(self.proc.pid)]

    stop_signal = signal.SIGTERM

    def stop(self) -> None:
        if self._log.closed:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        os.unlink(self.log_path)


class Fake(Proc):
    stop_signal = signal.SIGKILL  # a test server: no graceful drain of hanging requests

    def __init__(self, name: str, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.name = name
        port = port or free_port(host)
        cmd = [sys.executable, FAKE, "--host", host, "--port", str(port), "--name", name]
        super().__init__(cmd, host, port)

    def control(self, **kw) -> None:
        httpx.post(self.url + "/_control", json=kw, timeout=5).raise_for_status()

    def hits(self) -> int:
        return httpx.get(self.url + "/_stats", timeout=5).json()["hits"]


class RouterProc(Proc):
    def __init__(self, *args: str) -> None:
        port = free_port()
        cmd = [sys.executable, "-m", "router", "--port", str(port), "--log-level", "info", *args]
        super().__init__(cmd, "127.0.0.1", port)

    def metrics(self) -> dict[str, float]:
        """/metrics as {'name{labels}': value}."""
        r = httpx.get(self.url + "/metrics", timeout=5)
        out = {}
        for line in r.text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out


def wait_for(pred, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def procs():
    """start(proc) registers a process; all are stopped after the test, and none may linger."""
    started: list[Proc] = []

    def start(p: Proc, ready: bool = True) -> Proc:
        started.append(p)
        return p.wait_ready() if ready else p

    yield start
    pids = [pid for p in started if p.proc.poll() is None for pid in p.pids()]
    for p in started:
        try:
            p.stop()
        except Exception:  # stop the rest whatever happens to one
            p.proc.kill()
    time.sleep(0.1)
    assert not [pid for pid in pids if pid_alive(pid)], "processes left behind"
