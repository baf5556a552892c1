"""Runs the CUDA kernels' own source on the CPU, for tests on machines without a GPU.

The .cu file is compiled by g++ with emu/emu_runtime.h force-included (CUDA threads become
fibers, see that header) and emu/ standing in for cuda_fp16.h / cuda_bf16.h. Each kernel
gets an `emu_launch_<name>` entry taking the same void** parameter array as cuLaunchKernel,
so ops.py's launch code runs unchanged with CPU tensors' addresses.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch

from kernels_cuda import compiler

EMU_DIR = Path(__file__).resolve().parent / "emu"
_KERNEL_RE = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\('
)
_DTYPE_DEFINES = {torch.float16: "-DRS_DTYPE_F16", torch.bfloat16: "-DRS_DTYPE_BF16"}
_CXX_FLAGS = ["-std=c++17", "-O1", "-fno-strict-aliasing", "-w", f"-I{EMU_DIR}"]
_TRAMPOLINE = """
extern "C" int emu_launch_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx,
    unsigned by, unsigned bz, unsigned long smem, void** args, char* err, unsigned long len) {{
  std::function<void()> body = [args] {{ emu::invoke(&{name}, args); }};
  return emu::launch(dim3(gx, gy, gz), dim3(bx, by, bz), smem, body, err, len);
}}
"""


def compiler_available() -> bool:
    return shutil.which("g++") is not None


class EmuKernel:
    """A kernel of an emulated module; launch() mirrors compiler.Kernel.launch()."""

    def __init__(self, lib: ctypes.CDLL, name: str) -> None:
        self.name = name
        self._fn = getattr(lib, f"emu_launch_{name}")
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_uint] * 6 + [
            ctypes.c_ulong,
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
        ]
        self.launches: list[tuple] = []

    def launch(
        self,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: Sequence[ctypes._SimpleCData],
        shared_mem: int = 0,
        stream: int = 0,
    ) -> None:
        if min(grid) < 1 or min(block) < 1 or block[0] * block[1] * block[2] > 1024:
            raise RuntimeError(f"{self.name}: invalid launch shape grid={grid} block={block}")
        if not isinstance(stream, int) or not all(isinstance(v, int) for v in (*grid, *block)):
            raise RuntimeError(f"{self.name}: stream {stream!r}, grid and block must be ints")
        if grid[1] > 65535 or grid[2] > 65535:
            raise RuntimeError(f"{self.name}: grid {grid} exceeds 65535 in y or z")
        self.launches.append((grid, block, shared_mem))
        params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        err = ctypes.create_string_buffer(512)
        rc = self._fn(*grid, *block, shared_mem, ctypes.addressof(params), err, len(err))
        if rc:
            raise RuntimeError(f"{self.name}: {err.value.decode()}")


class Emulator:
    """Builds (and caches in `build_dir`) emulated modules, one per source/dtype/head_dim."""

    def __init__(self, build_dir: Path) -> None:
        self.build_dir = Path(build_dir)
        self.build_dir.mkdir(parents=True, exist_ok=True)
        self._libs: dict[tuple, ctypes.CDLL] = {}
        self.kernels: list[EmuKernel] = []

    def kernel(
        self,
        filename: str,
        name: str,
        dtype: torch.dtype,
        device: torch.device,
        head_dim: int | None = None,
    ) -> EmuKernel:
        """Same signature as ops._kernel."""
        key = (filename, dtype, head_dim)
        if key not in self._libs:
            self._libs[key] = self._build(filename, dtype, head_dim)
        kernel = EmuKernel(self._libs[key], name)
        self.kernels.append(kernel)
        return kernel

    def _build(self, filename: str, dtype: torch.dtype, head_dim: int | None) -> ctypes.CDLL:
        defines = [_DTYPE_DEFINES[dtype]]
        if head_dim is not None:
            defines.append(f"-DRS_HEAD_DIM={head_dim}")
        return self.build_source(filename, compiler.load_source(filename), defines)

    def build_source(self, label: str, source: str, defines: Sequence[str]) -> ctypes.CDLL:
        """Compiles CUDA source text for the emulator; kernels are `emu_launch_<name>`."""
        preprocessed = subprocess.run(
            ["g++", "-E", "-P", "-x", "c++", *_CXX_FLAGS, *defines, "-"],
            input=source,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        names = _KERNEL_RE.findall(preprocessed)
        if not names:
            raise RuntimeError(f"no kernels found in {label}")
        text = source + "".join(_TRAMPOLINE.format(name=n) for n in names)
        runtime = (EMU_DIR / "emu_runtime.h").read_text()
        digest = hashlib.sha256("\0".join([text, runtime, *defines, *_CXX_FLAGS]).encode())
        lib_path = self.build_dir / f"{label}-{digest.hexdigest()[:24]}.so"
        if not lib_path.exists():
            src_path = lib_path.with_suffix(".cpp")
            src_path.write_text(text)
            tmp = lib_path.with_suffix(f".{os.getpid()}.tmp")
            built = subprocess.run(
                [
                    "g++",
                    *_CXX_FLAGS,
                    *defines,
                    "-include",
                    str(EMU_DIR / "emu_runtime.h"),
                    "-shared",
                    "-fPIC",
                    "-x",
                    "c++",
                    str(src_path),
                    "-o",
                    str(tmp),
                ],
                capture_output=True,
                text=True,
            )
            if built.returncode:
                raise RuntimeError(f"g++ failed on {label}:\n{built.stderr[-4000:]}")
            os.replace(tmp, lib_path)
        return ctypes.CDLL(str(lib_path))
