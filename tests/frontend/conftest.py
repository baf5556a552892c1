"""Fixtures for the server tests: the real `python -m frontend` as a subprocess on a free port."""

from __future__ import annotations

import glob
import json
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
API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ipc_leftovers(pids: list[int]) -> list[str]:
    """Shared-memory segments and IPC folders that processes `pids` created and left."""
    found = []
    for pid in pids:
        found += glob.glob(f"/dev/shm/ringserve-mq-{pid}-*")
        found += glob.glob(f"{tempfile.gettempdir()}/ringserve-mq-{pid}-*")
    return found


class ServerProcess:
    """One `python -m frontend` process, its log in a file, stopped by stop()."""

    def __init__(self, *args: str, api_key: str | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.log_path = tempfile.mktemp(prefix="ringserve-test-server-", suffix=".log")
        cmd = [sys.executable, "-m", "frontend", "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self._log = open(self.log_path, "wb")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        self.ready_s: float | None = None
        self.engine_pid: int | None = None

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
        """Poll /health until 200; fail with the log if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=5.0).status_code == 200:
                    self.ready_s = time.monotonic() - self.t0
                    kids = child_pids(self.proc.pid)
                    self.engine_pid = kids[0] if kids else None
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"server not ready within {timeout} s:\n{self.log()[-4000:]}")

    def pids(self) -> list[int]:
        """The server process and its children (the EngineCore)."""
        return [self.proc.pid, *child_pids(self.proc.pid)]

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server and the EngineCore have used so far."""
        total = 0.0
        for pid in self.pids():
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    @staticmethod
    def leftovers(pids: list[int]) -> list[str]:
        """What processes `pids` left behind: themselves alive, shared memory, IPC folders."""
        alive = [f"pid {p} alive" for p in pids if pid_alive(p)]
        return alive + ipc_leftovers(pids)

    def metrics(self) -> dict[str, float]:
        """/metrics as {name: value}, summed over label sets."""
        with self.client() as c:
            r = c.get("/metrics")
        assert r.status_code == 200, r.text
        out: dict[str, float] = {}
        for line in r.text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
        return out

    @staticmethod
    def sse_events(lines) -> list:
        """The JSON payloads of a whole SSE stream, then the literal "[DONE]"."""
        events = []
        for line in lines:
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
        return events

    def client(self, timeout: float | httpx.Timeout = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.engine_pid is not None and pid_alive(self.engine_pid):
            os.kill(self.engine_pid, signal.SIGKILL)  # never leave a core behind a failed test
        self._log.close()


@pytest.fixture(scope="module")
def start_server():
    """Start servers (`start_server(*flags)`), all stopped when the module is done."""
    servers: list[ServerProcess] = []

    def start(*args: str, api_key: str | None = None) -> ServerProcess:
        server = ServerProcess(*args, api_key=api_key)
        servers.append(server)
        return server.wait_ready()

    yield start
    for server in servers:
        server.stop()
        os.unlink(server.log_path)
