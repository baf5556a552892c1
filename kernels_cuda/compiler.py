"""Compiles CUDA C with NVRTC to cubins, caches them on disk, loads and launches them.

Kernels are compiled at first use for the running GPU's exact architecture as a cubin
(machine code, not PTX), so a driver older than the compiler still loads them. Cubins are
cached under $XDG_CACHE_HOME/ringserve/kernels (or ~/.cache/ringserve/kernels), keyed by a
hash of the source, the options, the architecture and the NVRTC version; the directory is
owner-only because whatever sits there is later run on the GPU.

Launches go through the driver API (cuLaunchKernel) on the caller's stream, with raw
pointers taken from torch tensors.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import re
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from cuda.bindings import driver, nvrtc

KERNEL_DIR = Path(__file__).resolve().parent
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)
# Shared memory a block may use without opting in through a function attribute.
_DEFAULT_SMEM_LIMIT = 48 * 1024


class CompileError(RuntimeError):
    """NVRTC rejected a source; the message carries NVRTC's log."""


def load_source(filename: str, directory: Path = KERNEL_DIR) -> str:
    """Returns a kernel file with its local `#include "x.cuh"` lines inlined.

    Inlining makes the cache key (a hash of the text) cover the headers too.
    """
    seen: set[str] = set()

    def expand(name: str) -> str:
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"kernel source {name!r} not found in {directory}")
        if name in seen:
            return ""
        seen.add(name)
        text = path.read_text()
        return _INCLUDE_RE.sub(lambda m: expand(m.group(1)), text)

    return expand(filename)


def nvrtc_version() -> tuple[int, int]:
    """The (major, minor) version of the NVRTC library in use."""
    major, minor = _check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    return int(major), int(minor)


def supported_archs() -> list[int]:
    """Compute capabilities NVRTC can emit cubins for, as integers (90 for sm_90)."""
    (archs,) = _check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")
    return [int(a) for a in archs]


@cache
def cuda_include_dir() -> str:
    """Finds a directory holding cuda_fp16.h and cuda_bf16.h for NVRTC's -I.

    NVRTC does not ship these headers. Looks, in order, at $CUDA_HOME / $CUDA_PATH, the CUDA
    13 wheels (nvidia-cuda-runtime), /usr/local/cuda, the CUDA 12 wheels, then asks
    cuda-pathfinder.
    """
    candidates = [
        os.path.join(os.environ[var], "include")
        for var in ("CUDA_HOME", "CUDA_PATH")
        if os.environ.get(var)
    ]
    wheel_roots = _nvidia_wheel_roots()
    candidates += [os.path.join(root, "cu13", "include") for root in wheel_roots]
    candidates.append("/usr/local/cuda/include")
    candidates += [os.path.join(root, "cuda_runtime", "include") for root in wheel_roots]
    for directory in candidates:
        if _has_fp16_headers(directory):
            return directory
    try:
        from cuda.pathfinder import locate_nvidia_header_directory

        found = locate_nvidia_header_directory("cudart")
    except Exception:  # pathfinder is a last resort: any failure of it means "not found"
        found = None
    if found is not None and found.abs_path and _has_fp16_headers(found.abs_path):
        return found.abs_path
    raise FileNotFoundError(
        "cuda_fp16.h / cuda_bf16.h not found (looked in "
        + ", ".join(candidates)
        + "); install the CUDA toolkit, `pip install nvidia-cuda-runtime`, or set CUDA_HOME"
    )


def _nvidia_wheel_roots() -> list[str]:
    spec = importlib.util.find_spec("nvidia")
    return list(spec.submodule_search_locations or []) if spec else []


def _has_fp16_headers(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, h)) for h in ("cuda_fp16.h", "cuda_bf16.h"))


def cache_dir() -> Path:
    """The owner-only directory where cubins are cached; created on first use."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "ringserve" / "kernels"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"kernel cache {path} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o077:
        path.chmod(0o700)
    return path


def arch_name(arch: str | int | tuple[int, int]) -> str:
    """Normalizes an architecture (`"sm_90"`, `90`, `(9, 0)`) to NVRTC's `sm_XX` spelling."""
    if isinstance(arch, tuple):
        number = arch[0] * 10 + arch[1]
    elif isinstance(arch, int):
        number = arch
    else:
        match = re.fullmatch(r"sm_(\d+)a?", arch)
        if not match:
            raise ValueError(f"architecture {arch!r} is not of the form 'sm_90'")
        number = int(match.group(1))
        if arch.endswith("a"):
            return arch
    return f"sm_{number}"


def compile_cubin(source: str, name: str, arch: str, options: Sequence[str] = ()) -> bytes:
    """Compiles `source` for `arch` (e.g. "sm_90") to a cubin, through the on-disk cache.

    `name` names the program in NVRTC's messages and the cache file. `options` are extra
    NVRTC options such as "-DRS_DTYPE_BF16".
    """
    arch = arch_name(arch)
    number = int(re.sub(r"\D", "", arch))
    if number not in supported_archs():
        raise ValueError(
            f"NVRTC {nvrtc_version()} cannot compile for {arch}; it supports "
            + ", ".join(f"sm_{a}" for a in supported_archs())
        )
    full_options = [f"--gpu-architecture={arch}", "-std=c++17", "-lineinfo"]
    full_options += [f"-I{cuda_include_dir()}", *options]
    key = hashlib.sha256(
        "\0".join([source, *full_options, repr(nvrtc_version())]).encode()
    ).hexdigest()
    path = cache_dir() / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{arch}-{key[:40]}.cubin"
    try:
        cubin = path.read_bytes()
        if cubin:
            return cubin
    except FileNotFoundError:
        pass
    cubin = nvrtc_compile(source, name, full_options)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(cubin)
    os.replace(tmp, path)
    return cubin


def nvrtc_compile(source: str, name: str, options: Sequence[str]) -> bytes:
    """Runs NVRTC once, without the cache; raises CompileError with NVRTC's log."""
    (prog,) = _check(
        nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram"
    )
    try:
        opts = [o.encode() for o in options]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"NVRTC failed to compile {name} ({result.name}):\n{_log(prog)}")
        (size,) = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        if size == 0:
            raise CompileError(f"NVRTC produced no cubin for {name}; options were {options}")
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_log(source: str, name: str, arch: str, options: Sequence[str] = ()) -> str:
    """Compiles without the cache and returns NVRTC's log with ptxas' resource report.

    For checking registers, spills and shared memory of a kernel without a GPU.
    """
    full_options = [f"--gpu-architecture={arch_name(arch)}", "-std=c++17"]
    full_options += [f"-I{cuda_include_dir()}", "--ptxas-options=-v", *options]
    (prog,) = _check(
        nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram"
    )
    try:
        opts = [o.encode() for o in full_options]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"NVRTC failed to compile {name} ({result.name}):\n{_log(prog)}")
        return _log(prog)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _log(prog: object) -> str:
    (size,) = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
    if size <= 1:
        return ""
    buf = b" " * size
    _check(nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
    return buf.rstrip(b"\0 ").decode(errors="replace")


def _check(result: tuple, what: str) -> tuple:
    """Unpacks a cuda-python (status, *values) tuple, raising on a failed status."""
    status, *values = result
    if isinstance(status, nvrtc.nvrtcResult):
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"{what} failed: {status.name}")
    elif status != driver.CUresult.CUDA_SUCCESS:
        _, text = driver.cuGetErrorString(status)
        detail = text.decode() if isinstance(text, bytes) else str(status)
        raise RuntimeError(f"{what} failed: {status.name} ({detail})")
    return tuple(values)


class Kernel:
    """One `extern "C" __global__` function of a loaded module, launchable on a stream."""

    def __init__(self, function: driver.CUfunction, name: str) -> None:
        self.function = function
        self.name = name
        self._smem_opt_in = _DEFAULT_SMEM_LIMIT

    def launch(
        self,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: Sequence[ctypes._SimpleCData],
        shared_mem: int = 0,
        stream: int = 0,
    ) -> None:
        """Launches with `args` given as ctypes values in the kernel's parameter order."""
        if shared_mem > self._smem_opt_in:
            _check(
                driver.cuFuncSetAttribute(
                    self.function,
                    driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared_mem,
                ),
                f"raising {self.name}'s shared memory to {shared_mem} bytes",
            )
            self._smem_opt_in = shared_mem
        params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        _check(
            driver.cuLaunchKernel(
                self.function, *grid, *block, shared_mem, stream, ctypes.addressof(params), 0
            ),
            f"launching {self.name}",
        )


class Module:
    """A cubin loaded into the primary context of one device."""

    def __init__(self, cubin: bytes, device_index: int) -> None:
        _check(driver.cuInit(0), "cuInit")
        (device,) = _check(driver.cuDeviceGet(device_index), "cuDeviceGet")
        # torch runs on the primary context; loading there lets our kernels share its memory.
        (self.context,) = _check(driver.cuDevicePrimaryCtxRetain(device), "retaining context")
        _check(driver.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")
        self._cubin = cubin  # the driver reads the image during the call only; kept for debugging
        (self.module,) = _check(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
        self._kernels: dict[str, Kernel] = {}

    def kernel(self, name: str) -> Kernel:
        """The kernel named `name` (its extern "C" name)."""
        if name not in self._kernels:
            (function,) = _check(
                driver.cuModuleGetFunction(self.module, name.encode()), f"finding kernel {name}"
            )
            self._kernels[name] = Kernel(function, name)
        return self._kernels[name]
