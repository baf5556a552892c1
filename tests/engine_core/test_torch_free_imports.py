"""The scheduling side of the engine imports no torch (a claim of executor/ and sched/)."""

from __future__ import annotations

import subprocess
import sys

TORCH_FREE = [
    "engine_core.sched",
    "engine_core.sched.scheduler",
    "engine_core.executor",
    "engine_core.executor.multiproc",
    "engine_core.protocol",
    "engine_core.model_files",
    "engine_core.config",
    "engine_core.process",
]


def test_the_scheduling_side_imports_no_torch_in_a_fresh_interpreter():
    code = (
        "import importlib, sys\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", f"torch was imported: {out.stdout.strip()[:300]}"


def test_the_check_sees_a_torch_import():
    code = "import sys, engine_core.worker.model_runner; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "True"
