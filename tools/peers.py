"""The environment the benchmarks start other engines (llama-server, vLLM) in."""

from __future__ import annotations

import os


def peer_env(**defaults: str) -> dict[str, str]:
    """This process's environment for a peer engine, with `defaults` where unset.

    Without the OMP_WAIT_POLICY that importing engine_core set (if it set it rather than the
    user): OpenMP threads that sleep between parallel regions suit our engine, whose steps are
    a few long regions, and slowed llama.cpp's decode 3x (45 against 119 tok/s on one
    stream), whose graph runs hundreds of short ones a token.
    """
    import engine_core

    env = dict(os.environ)
    if engine_core.OMP_WAIT_POLICY_SET_HERE:
        env.pop("OMP_WAIT_POLICY", None)
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env
