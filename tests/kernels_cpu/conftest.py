"""Fixtures of the kernels_cpu tests."""

from __future__ import annotations

import pytest

from kernels_cpu import ops


@pytest.fixture(params=["native", "scalar"])
def library(request, monkeypatch):
    """Each test runs on the AVX2 build and on the plain x86-64 (scalar) one."""
    if request.param == "scalar":
        from kernels_cpu.build import library_path

        monkeypatch.setattr(ops, "_lib", ops.load_library(library_path(march="x86-64")))
    return request.param
