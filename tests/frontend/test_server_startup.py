"""The server's start-up (frontend/startup.py): failures end with a reason and exit 1, a signal
during start-up stops it cleanly, and the tokenizer loaded without torch is the same one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.frontend.conftest import REPO, free_port, ipc_leftovers
from tests.procs import child_pids, pid_alive

_TEXTS = ["Hello world!", "  spaces\tand\nnewlines ", "émoji 🙂 and 中文", "<|im_start|>user"]
_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def _server(*args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "frontend", "--port", str(free_port()), *args]
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen, timeout: float = 240.0) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the server did not exit within {timeout} s:\n{out[-4000:]}")
    return out


def test_missing_model_exits_1_naming_it_before_any_engine_starts():
    proc = _server("--model", "/no/such/model.gguf")
    out = _finish(proc, 60.0)
    assert proc.returncode == 1, out
    assert "the engine failed to start" in out and "/no/such/model.gguf" in out
    assert "engine_core" not in out  # no core process was started to fail


@pytest.mark.slow
def test_engine_start_failure_exits_1_with_its_reason(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)  # a GGUF header with nothing valid behind it
    proc = _server("--model", str(bad))
    kids: list[int] = []
    while proc.poll() is None and not kids:
        kids = child_pids(proc.pid)
        time.sleep(0.05)
    out = _finish(proc)
    assert proc.returncode == 1, out
    assert "the engine failed to start" in out, out
    assert "start-up failed" in out  # the core's own traceback, logged by the core
    assert [p for p in kids if pid_alive(p)] == []
    assert ipc_leftovers([proc.pid, *kids]) == []


@pytest.mark.slow
def test_sigterm_during_start_up_stops_the_engine_and_exits_0():
    proc = _server()
    kids: list[int] = []
    while proc.poll() is None and not kids:
        kids = child_pids(proc.pid)
        time.sleep(0.02)
    assert kids, "the engine core was spawned"
    proc.send_signal(signal.SIGTERM)  # while the engine loads
    out = _finish(proc)
    assert proc.returncode == 0, out
    assert "SIGTERM during start-up: stopping" in out
    assert [p for p in kids if pid_alive(p)] == []
    assert ipc_leftovers([proc.pid, *kids]) == []


def test_tokenizer_loaded_without_torch_is_the_same_and_torch_stays_importable():
    from engine_core.tokenizer import load_tokenizer

    script = f"""
import importlib.util, json, sys
from frontend.startup import load_tokenizer_without_torch
tok = load_tokenizer_without_torch(None, None)
print(json.dumps({{
    "torch_imported": "torch" in sys.modules,
    "torch_findable": importlib.util.find_spec("torch") is not None,
    "type": type(tok).__name__,
    "ids": [tok.encode(t) for t in {_TEXTS!r}],
    "decoded": [tok.decode(tok.encode(t)) for t in {_TEXTS!r}],
    "chat": tok.apply_chat_template({_CHAT!r}, tokenize=False, add_generation_prompt=True),
    "vocab": len(tok),
}}))
"""
    env = dict(os.environ, PYTHONPATH=REPO)
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert "PyTorch was not found" not in run.stderr
    assert got["torch_imported"] is False and got["torch_findable"] is True
    tok = load_tokenizer(None)
    assert got["type"] == type(tok).__name__
    assert got["ids"] == [tok.encode(t) for t in _TEXTS]
    assert got["decoded"] == [tok.decode(tok.encode(t)) for t in _TEXTS]
    assert got["chat"] == tok.apply_chat_template(_CHAT, tokenize=False, add_generation_prompt=True)
    assert got["vocab"] == len(tok)
