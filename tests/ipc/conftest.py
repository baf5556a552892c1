"""Fixtures for the ipc tests."""

from __future__ import annotations

import os
import time

import pytest
from ipc_helpers import Peers, our_names


@pytest.fixture
def peers():
    """Peer processes for the test; afterwards, nothing any of them or we created may remain."""
    group = Peers()
    try:
        yield group
    finally:
        group.stop_all()
    pids = {os.getpid()} | {p.pid for p in group.started}
    deadline = time.monotonic() + 5.0
    while our_names(pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert our_names(pids) == [], "queue names left behind"
