"""Processes of the live-Prometheus test: engine replicas, the router, Prometheus, each a
real subprocess on a loopback port with its log in a file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import httpx
import pytest
import yaml

from tests.deploy.deploy_files import REPO, RULES
from tests.procs import child_pids, pid_alive

NAMESPACE = "ringserve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """One subprocess, its output in a log file; ready() polls a URL until it answers 200."""

    def __init__(self, name: str, cmd: list[str], port: int) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = tempfile.mktemp(prefix=f"ringserve-deploy-{name}-", suffix=".log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        self.children: list[int] = []

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def ready(self, path: str, timeout: float = 300.0) -> Proc:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
                )
            try:
                if httpx.get(self.url + path, timeout=5.0).status_code == 200:
                    self.children = child_pids(self.proc.pid)
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"{self.name} not ready within {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.children:  # never leave an EngineCore behind a failed test
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


def start_engine(name: str, extra: list[str]) -> Proc:
    port = free_port()
    cmd = [sys.executable, "-m", "frontend", "--port", str(port), "--num-threads", "1"]
    cmd += ["--max-num-seqs", "8", "--disable-log-requests", *extra]
    return Proc(name, cmd, port)


def start_router(backends: list[str]) -> Proc:
    port = free_port()
    cmd = [sys.executable, "-m", "router", "--backends", ",".join(backends)]
    # The routing logic the Kubernetes manifests run, so that the same series exist.
    cmd += ["--routing-logic", "prefix-aware", "--host", "127.0.0.1", "--port", str(port)]
    return Proc("router", cmd, port)


def prometheus_config(engines: dict[str, Proc], router: Proc | None) -> dict:
    """Static targets labelled as the cluster's discovery labels them (namespace, pod), so the
    rules, the dashboard, the adapter rule and KEDA's queries run unchanged."""
    engine_targets = [
        {"targets": [f"127.0.0.1:{p.port}"], "labels": {"namespace": NAMESPACE, "pod": pod}}
        for pod, p in engines.items()
    ]
    jobs = [{"job_name": "ringserve-engine", "static_configs": engine_targets}]
    if router is not None:
        jobs.append(
            {
                "job_name": "ringserve-router",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{router.port}"],
                        "labels": {"namespace": NAMESPACE, "pod": "ringserve-router-0"},
                    }
                ],
            }
        )
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [RULES],
        "scrape_configs": jobs,
    }


def start_prometheus(binary: str, config: dict, workdir: str) -> Proc:
    path = os.path.join(workdir, "prometheus.yml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    port = free_port()
    cmd = [
        binary,
        f"--config.file={path}",
        f"--storage.tsdb.path={os.path.join(workdir, 'data')}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    return Proc("prometheus", cmd, port)


def query(prom: Proc, expr: str) -> list:
    """An instant query's result (a vector's series; a scalar as one item)."""
    r = httpx.get(f"{prom.url}/api/v1/query", params={"query": expr}, timeout=10.0)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    data = body["data"]
    return [data["result"]] if data["resultType"] in ("scalar", "string") else data["result"]


def series(prom: Proc, match: str) -> list[dict]:
    r = httpx.get(f"{prom.url}/api/v1/series", params={"match[]": match}, timeout=10.0)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{match}: {body}"
    return body["data"]


def label_values(prom: Proc, label: str, match: str) -> list[str]:
    r = httpx.get(
        f"{prom.url}/api/v1/label/{label}/values", params={"match[]": match}, timeout=10.0
    )
    return r.json()["data"]


def wait_all_have_data(prom: Proc, exprs: dict[str, str], timeout: float = 45.0) -> dict[str, str]:
    """Poll until every expression returns data; what still has none when time is up."""
    empty = dict(exprs)
    deadline = time.monotonic() + timeout
    while True:
        empty = {w: e for w, e in empty.items() if not query(prom, e)}
        if not empty or time.monotonic() > deadline:
            return empty
        time.sleep(1.0)


def run_load(send: Callable[[int], None], n: int) -> None:
    """`n` requests, 4 at a time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, range(n)))


# What Prometheus 2.x sends when it scrapes: it prefers OpenMetrics, where prometheus_client
# (0.26) writes `vllm:foo` as `vllm_foo` unless the server always answers in the text format.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def scraped_names(url: str) -> set[str]:
    """Series names on `url`/metrics as Prometheus receives them."""
    r = httpx.get(url + "/metrics", headers={"Accept": PROMETHEUS_ACCEPT}, timeout=10.0)
    assert r.status_code == 200, r.text
    lines = [ln for ln in r.text.splitlines() if ln and not ln.startswith("#")]
    return {ln.split("{")[0].split(" ")[0] for ln in lines}


def check_colon_names_survive(proc: Proc, names: list[str]) -> None:
    got = scraped_names(proc.url)
    escaped = [n for n in names if n.replace(":", "_") in got and n not in got]
    assert not escaped, (
        f"{proc.name} serves {escaped} with ':' escaped to '_' when asked as Prometheus asks "
        "(OpenMetrics): every dashboard panel on them says No data. Serve the text format "
        "(prometheus_client.generate_latest, as frontend/metrics.py does)."
    )
