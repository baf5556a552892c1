"""Compiles kernels_cpu's C++ sources with g++ into a shared library, cached by source hash.

`python -m kernels_cpu.build` runs at install (the Makefile) so the first start finds the
library; `library_path()` builds lazily otherwise. The cache key covers the sources, the
compiler's version and flags and this CPU's feature flags (the build uses -march=native), so
a cache directory shared between machines never hands one CPU another's instructions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile

logger = logging.getLogger(__name__)

SOURCES = (
    "quant_gemm.cpp",
    "quant_gemm_f32.cpp",
    "quant_gemm_bf16.cpp",
    "paged_attention.cpp",
    "prefill_attention.cpp",
    "small_ops.cpp",
    "model_step.cpp",
)
HEADERS = ("quant_blocks.h", "panel_kernels.h", "simd.h")
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
_HERE = os.path.dirname(os.path.abspath(__file__))


class BuildError(RuntimeError):
    """No compiler, or the compiler failed: the caller falls back to dequantized weights."""


def cache_dir() -> str:
    """Where built libraries live: $RINGSERVE_CACHE_DIR or ~/.cache/ringserve, /kernels_cpu."""
    root = os.environ.get("RINGSERVE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "ringserve"
    )
    return os.path.join(root, "kernels_cpu")


def find_compiler() -> str | None:
    """The C++ compiler to use: $CXX, else g++, else c++ on PATH; None when there is none."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cpuinfo_line(key: str) -> str:
    """The first line of /proc/cpuinfo that starts with key (e.g. "flags\t\t: fpu ..."), or ""
    where there is none or no /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line
    except OSError:
        pass
    return ""


def _cpu_flags() -> str:
    return cpuinfo_line("flags")


def _key(compiler: str, march: str) -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        with open(os.path.join(_HERE, name), "rb") as f:
            h.update(f.read())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    h.update(version.encode() + " ".join(FLAGS).encode() + march.encode())
    h.update(_cpu_flags().encode())
    return h.hexdigest()[:16]


def library_path(build: bool = True, march: str = "native") -> str:
    """Path of the compiled library, compiling it first if the cache lacks it.

    march: g++'s -march; "native" for use, "x86-64" (no AVX2) to test the scalar fallback.
    """
    compiler = find_compiler()
    if compiler is None:
        raise BuildError("no C++ compiler found (tried $CXX, g++, c++)")
    path = os.path.join(cache_dir(), f"ringserve_cpu_{_key(compiler, march)}.so")
    if os.path.isfile(path) or not build:
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
    os.close(fd)
    cmd = [
        compiler,
        *FLAGS,
        f"-march={march}",
        *(os.path.join(_HERE, s) for s in SOURCES),
        "-o",
        tmp,
    ]
    logger.info("kernels_cpu: compiling %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise BuildError(f"{compiler} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    os.replace(tmp, path)  # atomic: a concurrent build's reader never sees half a file
    return path


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(library_path())
    except BuildError as e:
        print(f"kernels_cpu: not built ({e}); the CPU path will use dequantized weights.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
