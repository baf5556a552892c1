"""NVRTC compilation, the cubin cache and source loading; no GPU needed."""

from __future__ import annotations

import ctypes
import os
import stat
from types import SimpleNamespace

import pytest
import torch

from kernels_cuda import compiler

# Every kernel source with the extra defines it needs; dtypes and head dims alternate
# between the architectures to cover both without compiling every combination twice.
SOURCES = {
    "cache.cu": [],
    "norm.cu": [],
    "rotary.cu": [],
    "activation.cu": [],
    "decode_attention.cu": ["-DRS_HEAD_DIM={head_dim}"],
    "prefill_attention.cu": ["-DRS_HEAD_DIM={head_dim}"],
}
ARCH_CONFIG = {"sm_80": ("-DRS_DTYPE_F16", 64), "sm_90": ("-DRS_DTYPE_BF16", 128)}
HEAVY = {"decode_attention.cu", "prefill_attention.cu"}


def _kernel_names(source: str) -> list[str]:
    import re

    found = re.findall(
        r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(', source
    )
    names = [n for n in found if n != "__launch_bounds__"]  # the macro-made decode kernels
    for g in re.findall(r"RS_DECODE_KERNEL\((\d+)\)\n", source):
        names.append(f"paged_attention_decode_g{g}")
    return names


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize(
    "filename",
    [pytest.param(f, marks=pytest.mark.slow) if f in HEAVY else f for f in SOURCES],
)
def test_every_kernel_compiles_to_a_cubin_for_ampere_and_hopper(filename, arch):
    dtype_define, head_dim = ARCH_CONFIG[arch]
    options = [dtype_define] + [o.format(head_dim=head_dim) for o in SOURCES[filename]]
    source = compiler.load_source(filename)
    cubin = compiler.compile_cubin(source, filename, arch, options)
    assert cubin[:4] == b"\x7fELF"  # machine code, not PTX text
    names = _kernel_names(source)
    assert names, "the test found no kernel to look for"
    for name in names:
        assert name.encode() in cubin, f"{name} missing from the {arch} cubin of {filename}"


def test_a_broken_source_raises_with_nvrtcs_log():
    source = 'extern "C" __global__ void broken(float* x) { x[0] = undefined_name; }'
    with pytest.raises(compiler.CompileError) as info:
        compiler.compile_cubin(source, "broken.cu", "sm_90")
    message = str(info.value)
    assert "broken.cu" in message
    assert "undefined_name" in message and "undefined" in message


def test_second_compile_is_served_from_the_disk_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    real = compiler.nvrtc_compile

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(compiler, "nvrtc_compile", counting)
    source = compiler.load_source("activation.cu")
    first = compiler.compile_cubin(source, "activation", "sm_90", ["-DRS_DTYPE_BF16"])
    second = compiler.compile_cubin(source, "activation", "sm_90", ["-DRS_DTYPE_BF16"])
    assert first == second
    assert calls == ["activation"]

    # Another dtype, architecture or source text is another entry.
    compiler.compile_cubin(source, "activation", "sm_90", ["-DRS_DTYPE_F16"])
    compiler.compile_cubin(source, "activation", "sm_80", ["-DRS_DTYPE_BF16"])
    compiler.compile_cubin(source + "\n// edited\n", "activation", "sm_90", ["-DRS_DTYPE_BF16"])
    assert len(calls) == 4

    cache = tmp_path / "ringserve" / "kernels"
    files = sorted(cache.glob("*.cubin"))
    assert len(files) == 4
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)


def test_an_empty_cache_file_is_recompiled(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    source = compiler.load_source("cache.cu")
    cubin = compiler.compile_cubin(source, "cache", "sm_90", ["-DRS_DTYPE_F16"])
    (path,) = (tmp_path / "ringserve" / "kernels").glob("*.cubin")
    path.write_bytes(b"")
    assert compiler.compile_cubin(source, "cache", "sm_90", ["-DRS_DTYPE_F16"]) == cubin


def test_cache_directory_is_made_owner_only(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = tmp_path / "ringserve" / "kernels"
    path.mkdir(parents=True)
    path.chmod(0o777)
    assert compiler.cache_dir() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_headers_for_half_and_bfloat16_are_found():
    directory = compiler.cuda_include_dir()
    assert os.path.isfile(os.path.join(directory, "cuda_bf16.h"))


def test_local_includes_are_inlined_so_the_cache_key_covers_them():
    source = compiler.load_source("decode_attention.cu")
    assert '#include "common.cuh"' not in source
    assert "__device__ __forceinline__ float warp_sum" in source
    with pytest.raises(FileNotFoundError, match="nope.cu"):
        compiler.load_source("nope.cu")


@pytest.mark.parametrize(
    ("given", "expected"),
    [("sm_90", "sm_90"), (90, "sm_90"), ((8, 6), "sm_86"), ("sm_90a", "sm_90a")],
)
def test_architecture_spellings(given, expected):
    assert compiler.arch_name(given) == expected


def test_bad_or_unsupported_architectures_are_rejected():
    with pytest.raises(ValueError, match="compute_90"):
        compiler.arch_name("compute_90")
    with pytest.raises(ValueError, match="sm_20"):
        compiler.compile_cubin("", "empty", "sm_20")


class FakeDriver:
    """Stands in for cuda.bindings.driver where no GPU is present; records launches."""

    class CUresult:
        CUDA_SUCCESS = 0

    class CUfunction_attribute:
        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8

    def __init__(self):
        self.launches = []
        self.attributes = []
        self.calls = []

    def __getattr__(self, name):
        # Module loading: cuInit, cuDeviceGet, cuDevicePrimaryCtxRetain, cuCtxSetCurrent,
        # cuModuleLoadData, cuModuleGetFunction each succeed and return a labelled handle.
        def call(*args):
            self.calls.append((name, args))
            return (0,) if name in ("cuInit", "cuCtxSetCurrent") else (0, f"{name}-handle")

        return call

    def cuFuncSetAttribute(self, function, attribute, value):
        self.attributes.append((function, attribute, value))
        return (0,)

    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        slots = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        values = (
            ctypes.c_void_p.from_address(slots[0]).value,
            ctypes.c_int32.from_address(slots[1]).value,
            ctypes.c_int64.from_address(slots[2]).value,
            ctypes.c_float.from_address(slots[3]).value,
        )
        self.launches.append(((gx, gy, gz), (bx, by, bz), smem, stream, values, extra))
        return (0,)


def test_launch_passes_each_argument_by_address_and_opts_into_large_shared_memory(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(compiler, "driver", fake)
    kernel = compiler.Kernel("function-handle", "demo")
    args = [ctypes.c_void_p(0xABC0), ctypes.c_int32(-7), ctypes.c_int64(2**40), ctypes.c_float(0.5)]
    kernel.launch((3, 2, 1), (128, 1, 1), args, shared_mem=1024, stream=77)
    kernel.launch((1, 1, 1), (32, 1, 1), args, shared_mem=70_000, stream=77)
    kernel.launch((1, 1, 1), (32, 1, 1), args, shared_mem=60_000, stream=77)
    assert fake.launches[0] == ((3, 2, 1), (128, 1, 1), 1024, 77, (0xABC0, -7, 2**40, 0.5), 0)
    # Above 48 KiB the function must opt in, once for the largest size asked so far.
    assert fake.attributes == [("function-handle", 8, 70_000)]
    assert [launch[2] for launch in fake.launches] == [1024, 70_000, 60_000]


def test_kernels_are_compiled_for_the_devices_architecture_once_per_variant(monkeypatch):
    from kernels_cuda import launch

    loaded = []

    class FakeModule:
        def __init__(self, cubin, index):
            loaded.append((cubin[:4], index))

        def kernel(self, name):
            return f"kernel:{name}"

    monkeypatch.setattr(launch, "_modules", {})
    monkeypatch.setattr(compiler, "Module", FakeModule)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    device = torch.device("cuda", 0)
    got = launch.kernel("activation.cu", "silu_and_mul", torch.bfloat16, device)
    assert got == "kernel:silu_and_mul"
    launch.kernel("activation.cu", "silu_and_mul", torch.bfloat16, device)
    launch.kernel("activation.cu", "silu_and_mul", torch.float16, device)
    assert loaded == [(b"\x7fELF", 0), (b"\x7fELF", 0)]


def test_stream_and_sm_count_come_from_torch(monkeypatch):
    from kernels_cuda import launch

    monkeypatch.setattr(torch.cuda, "current_stream", lambda d: SimpleNamespace(cuda_stream=1234))
    props = SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)
    assert launch.stream(torch.device("cuda", 0)) == 1234
    assert launch.sm_count(torch.device("cuda", 0)) == 132


def test_module_loads_the_cubin_into_the_devices_primary_context(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(compiler, "driver", fake)
    module = compiler.Module(b"\x7fELF-cubin", 1)
    kernel = module.kernel("silu_and_mul")
    assert module.kernel("silu_and_mul") is kernel  # looked up once
    assert kernel.function == "cuModuleGetFunction-handle"
    assert [name for name, _ in fake.calls] == [
        "cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuCtxSetCurrent",
        "cuModuleLoadData", "cuModuleGetFunction",
    ]  # fmt: skip
    assert ("cuDeviceGet", (1,)) in fake.calls
    assert ("cuModuleLoadData", (b"\x7fELF-cubin",)) in fake.calls
    assert ("cuModuleGetFunction", ("cuModuleLoadData-handle", b"silu_and_mul")) in fake.calls
