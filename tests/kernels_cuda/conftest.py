"""Fixtures for the kernel tests: a private NVRTC cache and the CPU emulator of the kernels."""

from __future__ import annotations

import pytest
from kernel_emulator import Emulator, compiler_available

from kernels_cuda import launch, ops


@pytest.fixture(autouse=True)
def private_kernel_cache(tmp_path_factory, monkeypatch):
    """Keeps compiled cubins out of the user's ~/.cache; shared by the whole session."""
    cache_home = tmp_path_factory.getbasetemp() / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    return cache_home


@pytest.fixture(scope="session")
def emulator(request) -> Emulator:
    if not compiler_available():
        pytest.skip("g++ is needed to emulate the CUDA kernels on the CPU")
    # pytest's cache directory keeps the built modules between runs (a temporary one when
    # the cache plugin is off).
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Emulator(cache.mkdir("kernel_emulator"))
    return Emulator(request.getfixturevalue("tmp_path_factory").mktemp("kernel_emulator"))


@pytest.fixture
def emulated_ops(emulator, monkeypatch):
    """ops taking its CUDA path for CPU tensors, with the kernels run by the emulator."""
    monkeypatch.setattr(ops, "_use_cuda", lambda t: True)
    monkeypatch.setattr(launch, "kernel", emulator.kernel)
    monkeypatch.setattr(launch, "stream", lambda device: 0)
    # A small GPU, so that modest contexts already take the split-K path.
    monkeypatch.setattr(launch, "sm_count", lambda device: 4)
    return ops
