"""Fixtures of the kernels_cpu tests."""

from __future__ import annotations

import pytest

from kernels_cpu import ops


def _has_avx2() -> bool:
    with open("/proc/cpuinfo") as f:
        return " avx2" in f.read()


@pytest.fixture(params=["native", "avx2", "scalar"])
def library(request, monkeypatch):
    """Each test runs on the native build (AVX-512 where the CPU has it), an AVX2 one (the
    8-lane paths, on any AVX2 CPU) and the plain x86-64 (scalar) one."""
    if request.param != "native":
        from kernels_cpu.build import library_path

        if request.param == "avx2" and not _has_avx2():
            pytest.skip("this CPU has no AVX2")
        march = "haswell" if request.param == "avx2" else "x86-64"
        monkeypatch.setattr(ops, "_lib", ops.load_library(library_path(march=march)))
    return request.param
