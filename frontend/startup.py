"""The server's start-up, before its HTTP stack is imported: the engine first, then the rest.

The EngineCore's start (its interpreter, torch's import, the model load and warm-up) is the
long pole, so `python -m frontend` spawns it before anything else it can defer. The
handshake with the core and the tokenizer load then run on threads while the main thread
imports uvicorn, starlette and the endpoints (the machine's second core does the engine's
part). The tokenizer is loaded with torch hidden: transformers imports torch whenever it is
installed (two seconds of CPU here, next to the engine's own import of it), and this
process, which only tokenizes, never uses it; once loaded, torch is importable again (a
structured-output request's xgrammar imports it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from engine_core.config import EngineConfig


@dataclass
class Starting:
    """A start-up under way: the ready EngineCoreClient and the tokenizer, as futures, and
    the signals (SIGINT, SIGTERM) that arrived before the server could act on them."""

    client: concurrent.futures.Future
    tokenizer: concurrent.futures.Future
    signals: list[int] = field(default_factory=list)
    # Seconds since the process started at which each part was done (the ready line's).
    done_at: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, f in (("engine ready", self.client), ("tokenizer", self.tokenizer)):
            f.add_done_callback(functools.partial(self._done, name))

    def _done(self, name: str, _: concurrent.futures.Future) -> None:
        self.done_at[name] = seconds_since_process_start()

    def summary(self) -> str:
        """'engine ready at 2.9 s, tokenizer at 1.8 s' (for the log)."""
        return ", ".join(f"{k} at {v:.2f} s" for k, v in sorted(self.done_at.items()))


def start(config: EngineConfig) -> Starting:
    """Spawn the EngineCore, then hand its handshake and the tokenizer load to two threads;
    neither waits for the other."""
    from frontend.core_client import EngineCoreClient

    # Spawned here, on the main thread: the core's parent-death signal follows the thread
    # that started it, and the pool's threads end.
    core = EngineCoreClient(config, wait=False)
    pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="startup")
    try:
        client = pool.submit(core.wait_ready)
        tokenizer = pool.submit(load_tokenizer_without_torch, config.model, config.tokenizer)
    finally:
        pool.shutdown(wait=False)
    return Starting(client, tokenizer)


def load_tokenizer_without_torch(model: str | None, tokenizer: str | None) -> Any:
    """engine_core.tokenizer.load_tokenizer, with torch hidden from transformers while it
    imports and loads, when the tokenizer is a saved one (a GGUF's first conversion, done
    once and cached, is left to transformers' usual path)."""
    from engine_core.tokenizer import is_saved_tokenizer, load_tokenizer

    if "torch" in sys.modules or not is_saved_tokenizer(model, tokenizer):
        return load_tokenizer(model, tokenizer)
    with _torch_hidden():
        return load_tokenizer(model, tokenizer)


@contextlib.contextmanager
def _torch_hidden() -> Iterator[None]:
    # A None entry in sys.modules makes `import torch` raise ImportError and find_spec()
    # return None, which is how transformers decides that torch is not installed.
    # transformers' warning that it found no PyTorch would only mislead here.
    quiet = logging.getLogger("transformers")
    quiet.addFilter(_no_torch_warning)
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
        quiet.removeFilter(_no_torch_warning)


def _no_torch_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("PyTorch was not found")


def seconds_since_process_start() -> float:
    """Wall time since this process was created (the ready line reports it)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
