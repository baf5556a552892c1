"""Fixtures for the deploy tests: a Prometheus and promtool (Debian's package, installed with
apt-get when missing: CI runs as root)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def _install_prometheus() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "prometheus/promtool are not installed and this is not root: "
            "run `apt-get update && apt-get install -y prometheus` first"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"],
    ):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if out.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")


@pytest.fixture(scope="session")
def prometheus_bins() -> dict[str, str]:
    """Paths of `prometheus` and `promtool`."""
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        _install_prometheus()
    bins = {name: shutil.which(name) for name in ("prometheus", "promtool")}
    missing = [n for n, p in bins.items() if p is None]
    if missing:
        pytest.fail(f"apt-get installed prometheus but {missing} is not on PATH")
    return bins
