"""Python face of model_step.cpp: a Llama model's decoder layers for one step in one call.

`LayerWeights` per decoder layer (tensors the caller keeps alive: the structs hold their
data pointers), `LlamaLayers` built once from them, then `run()` per step. The caller
decides when the call applies (quantized layers, fp32 activations, the step's rows);
engine_core/models/fused_step.py does for the Llama model.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kernels_cpu import ops

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", _ptr),
        ("post_norm", _ptr),
        ("qkv", _ptr),
        ("o", _ptr),
        ("gate_up", _ptr),
        ("down", _ptr),
        ("wtype_qkv", _i64),
        ("wtype_o", _i64),
        ("wtype_gate_up", _i64),
        ("wtype_down", _i64),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        ("num_layers", _i64),
        ("hidden", _i64),
        ("heads", _i64),
        ("kv_heads", _i64),
        ("head_dim", _i64),
        ("intermediate", _i64),
        ("block_size", _i64),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("layers", ctypes.POINTER(_Layer)),
        ("final_norm", _ptr),
        ("bf16_min_rows", _i64),
        ("kv_bf16", _i64),
    ]


# struct Group {int64 start, end, width; const int64* block_ids; const float* bias}: as rows
# of 5 int64 (pointers as integers), one numpy array a step.
_GROUP_FIELDS = 5
# struct Prefill {int64 start, query_len, num_computed; const int64* block_ids}: likewise.
_PREFILL_FIELDS = 4


@dataclass
class LayerWeights:
    """One decoder layer: fp32 norm weights and (blocks, ggml type) of its four linears."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: tuple[torch.Tensor, int]
    o: tuple[torch.Tensor, int]
    gate_up: tuple[torch.Tensor, int]
    down: tuple[torch.Tensor, int]


class LlamaLayers:
    """The layers' weight table, built once; run() executes them for a step."""

    def __init__(
        self,
        layers: list[LayerWeights],
        final_norm: torch.Tensor,
        *,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        intermediate: int,
        eps: float,
        bf16_min_rows: int = 0,
    ) -> None:
        """bf16_min_rows: steps of this many rows or more multiply in bf16 (ops.gemm_bf16,
        which needs ops.has_bf16_gemm()); 0, never."""
        lib = ops._load()
        if lib is None:
            raise RuntimeError(f"kernels_cpu is not available: {ops._load_error}")
        if not hasattr(lib, "_rs_llama_layers_declared"):
            lib.rs_llama_layers.argtypes = [
                ctypes.POINTER(_Model),
                _ptr,
                _i64,
                _ptr,
                _i64,
                _ptr,
                _ptr,
                _ptr,
                _ptr,
                _i64,
                _ptr,
                _i64,
                ctypes.c_int,
            ]
            lib._rs_llama_layers_declared = True
        self._lib = lib
        if bf16_min_rows and not ops.has_bf16_gemm():
            raise ValueError("bf16_min_rows needs a CPU with AVX512-BF16 (ops.has_bf16_gemm()).")
        floats = [final_norm] + [t for w in layers for t in (w.input_norm, w.post_norm)]
        for t in floats:
            if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != hidden:
                raise ValueError(f"norm weights must be contiguous float32 [{hidden}].")
        self._keep = (layers, final_norm)  # the tensors whose pointers the table holds
        table = (_Layer * len(layers))()
        shapes = {
            "qkv": ((heads + 2 * kv_heads) * head_dim, hidden),
            "o": (hidden, heads * head_dim),
            "gate_up": (2 * intermediate, hidden),
            "down": (hidden, intermediate),
        }
        for entry, w in zip(table, layers, strict=True):
            entry.input_norm, entry.post_norm = w.input_norm.data_ptr(), w.post_norm.data_ptr()
            for name, (n, k) in shapes.items():
                blocks, wtype = getattr(w, name)
                ops._check(blocks, wtype, n, k)
                setattr(entry, name, blocks.data_ptr())
                setattr(entry, f"wtype_{name}", wtype)
        self._table = table
        self._model = _Model(
            len(layers),
            hidden,
            heads,
            kv_heads,
            head_dim,
            intermediate,
            0,  # block_size: set per step from the cache's shape
            eps,
            head_dim**-0.5,
            table,
            final_norm.data_ptr(),
            bf16_min_rows,
            0,  # kv_bf16: set per step from the cache's dtype
        )
        self.hidden, self.kv_width = hidden, kv_heads * head_dim
        # Steps of more rows run op by op (engine_core/models/fused_step.py sets it).
        self.max_rows = 1 << 30
        # Whether steps with prefill rows run here too: where kernels_cpu's prefill attention
        # takes the model's shape (an AVX-512 build).
        self.takes_prefills = ops.prefill_attention_supported(heads, kv_heads, head_dim)
        self.head_dim, self.num_layers, self.heads = head_dim, len(layers), heads

    def run(
        self,
        h: torch.Tensor,
        kv_caches: torch.Tensor,
        slots: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        groups: list[tuple[int, int, torch.Tensor, torch.Tensor]],
        prefills: Sequence[tuple[int, int, int, torch.Tensor]] = (),
    ) -> torch.Tensor:
        """The final norm's output for h [T, hidden] (the embeddings; overwritten in place).

        kv_caches [layers, 2, blocks, block_size, kv_heads, head_dim] fp32 or bf16 (where
        ops.bf16_attention_supported: written rounded to nearest even); slots [T] int64;
        cos/sin [T, head_dim / 2]; groups (start, end, block_ids, bias) of single-query rows
        and prefills (start, query_len, num_computed, block_ids) of multi-token rows (causal
        over the cache's first num_computed + query_len keys, as torch_paged.PrefillRow
        holds them; where ops.prefill_attention_supported), each of the T tokens in one of
        them (a short row's group may follow a prefill row, as AttentionMetadata orders them).
        """
        tokens = h.shape[0]
        kv = kv_caches
        bf16_kv = kv.dtype == torch.bfloat16
        if bf16_kv and not ops.bf16_attention_supported(
            self.heads, self.kv_width // self.head_dim, self.head_dim
        ):
            raise ValueError("this model's shape reads a fp32 KV cache only.")
        if (
            kv.dtype not in (torch.float32, torch.bfloat16)
            or not kv.is_contiguous()
            or kv.shape[0] != self.num_layers
            or kv.shape[4] * kv.shape[5] != self.kv_width
        ):
            raise ValueError(f"kv_caches of shape {tuple(kv.shape)} do not fit the model.")
        if h.dtype != torch.float32 or not h.is_contiguous() or h.shape[1] != self.hidden:
            raise ValueError(f"h must be contiguous float32 [T, {self.hidden}].")
        if slots.dtype != torch.int64 or slots.numel() != tokens:
            raise ValueError(f"slots must be int64 [{tokens}].")
        for t in (cos, sin):
            if not t.is_contiguous() or t.numel() != tokens * self.head_dim // 2:
                raise ValueError(f"cos/sin must be contiguous [{tokens}, {self.head_dim // 2}].")
        block_size = self._model.block_size = kv.shape[3]
        self._model.kv_bf16 = int(bf16_kv)
        if prefills and not self.takes_prefills:
            raise ValueError("prefill rows need kernels_cpu's prefill attention for this shape.")
        rows = np.empty((len(groups), _GROUP_FIELDS), dtype=np.int64)
        spans = []  # every row's tokens [start, end): together they must be [0, T)
        for i, (start, end, block_ids, bias) in enumerate(groups):
            width = block_ids.numel() // max(end - start, 1)
            if end <= start or bias.numel() != (end - start) * width * block_size:
                raise ValueError(f"a group of rows [{start}, {end}) does not fit its bias.")
            rows[i] = (start, end, width, block_ids.data_ptr(), bias.data_ptr())
            spans.append((start, end))
        prefill_rows = np.empty((len(prefills), _PREFILL_FIELDS), dtype=np.int64)
        for i, (start, query_len, num_computed, block_ids) in enumerate(prefills):
            blocks = -(-(num_computed + query_len) // block_size)
            if query_len < 1 or num_computed < 0:
                raise ValueError(f"a prefill row of {query_len} tokens after {num_computed}.")
            if (
                block_ids.dtype != torch.int64
                or block_ids.numel() < blocks
                or not block_ids.is_contiguous()
            ):
                raise ValueError(f"a prefill row's block_ids must be int64 [>= {blocks}].")
            prefill_rows[i] = (start, query_len, num_computed, block_ids.data_ptr())
            spans.append((start, start + query_len))
        covered = 0
        for start, end in sorted(spans):
            if start != covered:
                raise ValueError("the groups and prefill rows must cover the step's tokens once.")
            covered = end
        if covered != tokens:
            raise ValueError(f"the groups and prefill rows cover {covered} of {tokens} tokens.")
        rc = self._lib.rs_llama_layers(
            ctypes.byref(self._model),
            h.data_ptr(),
            tokens,
            kv.data_ptr(),
            kv.shape[2],
            slots.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            rows.ctypes.data,
            len(groups),
            prefill_rows.ctypes.data,
            len(prefills),
            torch.get_num_threads(),
        )
        if rc:
            raise RuntimeError(f"rs_llama_layers failed ({rc}).")
        return h
