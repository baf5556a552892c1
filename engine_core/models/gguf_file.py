"""A fast GGUF reader: metadata and memory-mapped tensor data, skipping the tokenizer arrays.

gguf.GGUFReader parses every tokenizer string into numpy views, seconds for SmolLM2's
vocabulary and merges. Loading weights only needs the scalar metadata and the tensor table,
so this reader steps over arrays (keeping their length) and hands each tensor's raw bytes
to gguf.quants.dequantize.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
# GGUFValueType -> struct format of a scalar
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One tensor's name, shape (rows first, as torch), ggml type and raw bytes."""

    name: str
    shape: tuple[int, ...]
    tensor_type: int  # gguf.GGMLQuantizationType value
    data: np.ndarray  # uint8 view into the memory-mapped file

    def dequantize(self) -> np.ndarray:
        """float32 values with `shape`."""
        import gguf

        qtype = gguf.GGMLQuantizationType(self.tensor_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        # A plain ndarray view: numpy.memmap slices cost a Python callback each (2x slower).
        raw = np.asarray(self.data).reshape(-1, self.shape[-1] // block * type_size)
        return gguf.quants.dequantize(raw, qtype).astype(np.float32, copy=False).reshape(self.shape)


class GGUFFile:
    """Metadata (arrays replaced by their length) and tensors of a GGUF file, memory-mapped."""

    @classmethod
    def open(cls, path: str) -> GGUFFile:
        """The file parsed once a process: the header walk (~100k tokenizer strings) costs
        ~0.2 s, and the config and the weights both read it. A changed file is parsed anew."""
        st = os.stat(path)
        return _open_cached(os.path.realpath(path), st.st_mtime_ns, st.st_size)

    def __init__(self, path: str) -> None:
        import gguf

        self.path = path
        self._buf = np.memmap(path, dtype=np.uint8, mode="r")
        self._mv = memoryview(self._buf)
        self._pos = 0
        if bytes(self._mv[:4]) != _MAGIC:
            raise ValueError(f"{path!r} is not a GGUF file (bad magic).")
        self._pos = 4
        version, n_tensors, n_kv = self._unpack("<IQQ")
        if version < 2:
            raise ValueError(
                f"{path!r}: GGUF version {version} is not supported (need 2 or later)."
            )
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.fields[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            qtype, offset = self._unpack("<IQ")
            infos.append((name, tuple(reversed(dims)), qtype, offset))
        alignment = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, shape, qtype, offset in infos:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
            nbytes = int(np.prod(shape)) // block * type_size
            data = self._buf[start + offset : start + offset + nbytes]
            self.tensors[name] = GGUFTensor(name, shape, qtype, data)

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._mv, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        s = bytes(self._mv[self._pos : self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            item_type, count = self._unpack("<IQ")
            self._skip_array(item_type, count)
            return [None] * count
        if vtype not in _SCALARS:
            raise ValueError(f"{self.path!r}: unknown GGUF value type {vtype}.")
        return self._unpack("<" + _SCALARS[vtype])[0]

    def _skip_array(self, item_type: int, count: int) -> None:
        if item_type in _SCALARS:
            self._pos += struct.calcsize("<" + _SCALARS[item_type]) * count
        elif item_type == _STRING:
            mv, pos, unpack = self._mv, self._pos, struct.unpack_from
            for _ in range(count):
                pos += 8 + unpack("<Q", mv, pos)[0]
            self._pos = pos
        else:
            for _ in range(count):
                self._value(item_type)


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(path)
