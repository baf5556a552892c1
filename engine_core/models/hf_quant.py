"""Hugging Face AWQ (GEMM) and GPTQ (4-bit) checkpoints: config checks, unpacking, loading.

The published layouts (AutoAWQ's WQLinear_GEMM, AutoGPTQ's QuantLinear; vLLM's awq.py and
gptq.py read the same), for a linear layer of `in` inputs and `out` outputs, groups of g:
- AWQ: qweight int32 [in, out/8], eight output columns a word, nibble j (bits 4j..4j+3)
  holding column 8c + AWQ_ORDER[j]; qzeros int32 [in/g, out/8] packed the same way; scales
  fp16 [in/g, out]; w[o, i] = (q[i, o] - z[i // g, o]) * s[i // g, o].
- GPTQ: qweight int32 [in/8, out], eight input rows a word (nibble j: row 8r + j); qzeros
  int32 [groups, out/8] (nibble j: column 8c + j) holding z - 1 (checkpoint_format "gptq",
  v1) or z ("gptq_v2"); scales fp16 [groups, out]; g_idx int32 [in], each input column's
  group (with desc_act the columns were quantized in another order: g_idx is not monotone);
  w[o, i] = (q[i, o] - z[g_idx[i], o]) * s[g_idx[i], o].

On the CPU kernels' path each group of 32 input columns becomes a Q4_Z block of kernels_cpu
(fp16 d = s, integer z): bit-exact, since (q - z) * s is exact in fp32. Q4_1 would need
m = -z * s in fp16, which rounds (z * s has up to 15 significant bits). With desc_act the
input columns are stored sorted by group, and the activations permuted to match at run time
(index_select), as vLLM's exllama path does; fused q/k/v or gate/up parts with different
permutations each run alone on their own permuted input. Elsewhere (CUDA, TP > 1, no
compiler, --quantization none) every weight is dequantized to (q - z) * s at load; a layer
whose groups cut blocks of 32, whose scales are no fp16 values or whose fused parts are
stored partly quantized is dequantized alone, with a log line.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine_core.models.layers import Linear
from engine_core.models.llama import LlamaForCausalLM, Shard, hf_weight_shapes
from engine_core.models.quant_layers import QuantizedLinear
from kernels_cpu import ops

logger = logging.getLogger(__name__)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds column AWQ_ORDER[j]
_AWQ_UNDO = tuple(AWQ_ORDER.index(j) for j in range(8))  # column j sits in nibble _AWQ_UNDO[j]
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
_AWQ_SHIFTS = 4 * torch.tensor(_AWQ_UNDO, dtype=torch.int32)


@dataclass(frozen=True, slots=True)
class HFQuantConfig:
    """What of config.json's quantization_config the loader needs, checked."""

    method: str  # "awq" or "gptq"
    group_size: int  # -1: one group over all input columns
    desc_act: bool
    zero_offset: int  # added to the stored zero points: 1 for GPTQ's v1 format, else 0

    @classmethod
    def parse(cls, qc: Any) -> HFQuantConfig | None:
        """None for no quantization_config; a ValueError naming the key for what we do not load."""
        if qc is None:
            return None
        if not isinstance(qc, dict):
            raise ValueError(f"quantization_config must be an object, got {qc!r}.")
        method = qc.get("quant_method")
        if method not in ("awq", "gptq"):
            raise ValueError(
                f"quantization_config: quant_method={method!r} is not supported "
                "(supported: 'awq', 'gptq')."
            )
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            raise ValueError(f"quantization_config: bits={bits!r} is not supported (only 4).")
        group_size = qc.get("group_size", qc.get("q_group_size", 128))
        if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
            raise ValueError(f"quantization_config: group_size={group_size!r} is not valid.")
        if method == "awq":
            version = qc.get("version", "gemm")
            if str(version).lower() != "gemm":
                raise ValueError(
                    f"quantization_config: version={version!r} is not supported (only 'gemm': "
                    "AWQ's GEMV layouts pack their words differently)."
                )
            if qc.get("zero_point", True) is not True:
                raise ValueError(
                    f"quantization_config: zero_point={qc['zero_point']!r} is not supported "
                    "(AWQ GEMM checkpoints carry zero points)."
                )
            return cls("awq", group_size, False, 0)
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(
                f"quantization_config: checkpoint_format={fmt!r} is not supported "
                "(supported: 'gptq', 'gptq_v2')."
            )
        if qc.get("is_marlin_format"):
            raise ValueError("quantization_config: is_marlin_format=true is not supported.")
        desc_act = qc.get("desc_act", False)
        if not isinstance(desc_act, bool):
            raise ValueError(f"quantization_config: desc_act={desc_act!r} must be a boolean.")
        return cls("gptq", group_size, desc_act, 1 if fmt == "gptq" else 0)


@dataclass(slots=True)
class IntWeight:
    """One layer's quantized weight unpacked, input columns in the checkpoint's natural order."""

    q: torch.Tensor  # uint8 [out, in], 0..15
    zeros: torch.Tensor  # int32 [groups, out]
    scales: torch.Tensor  # float32 [groups, out] (fp16 values)
    g_idx: torch.Tensor  # int64 [in]: each input column's group

    def dequantized(self) -> torch.Tensor:
        """(q - z) * s as float32 [out, in]: exact (a small integer times an fp16 value)."""
        z = self.zeros[self.g_idx].t().float()
        return (self.q.float() - z) * self.scales[self.g_idx].t()


def _unpack_cols(packed: torch.Tensor, awq: bool = False) -> torch.Tensor:
    """int32 [r, c] of eight nibbles a word -> uint8 [r, 8c]: column 8c + j from nibble j
    (awq: from nibble _AWQ_UNDO[j], AWQ's order undone)."""
    r = packed.shape[0]
    shifts = _AWQ_SHIFTS if awq else _SHIFTS
    return ((packed.to(torch.int32)[:, :, None] >> shifts) & 0xF).to(torch.uint8).reshape(r, -1)


class HFQuantWeights:
    """An AWQ or GPTQ checkpoint's tensors: plain ones as stored, quantized ones dequantized.

    `get` is the WeightSource the model's own load_weights reads (the dequantized path);
    `int_weight` hands load_hf_quantized a layer's integers as they are.
    """

    def __init__(self, directory: str, quant: HFQuantConfig) -> None:
        from safetensors import safe_open

        paths = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if not paths:
            raise FileNotFoundError(f"no *.safetensors files in {directory!r}.")
        self.quant = quant
        self._files = [safe_open(p, framework="pt") for p in paths]
        self._where = {name: f for f in self._files for name in f.keys()}

    @classmethod
    def open(cls, directory: str) -> HFQuantWeights | None:
        """The directory's weights when its config.json has a quantization_config, else None."""
        quant = read_quant_config(directory)
        return None if quant is None else cls(directory, quant)

    def is_quantized(self, prefix: str) -> bool:
        """Whether layer `prefix` (e.g. model.layers.0.mlp.up_proj) is stored quantized."""
        return f"{prefix}.qweight" in self._where

    def _raw(self, name: str) -> torch.Tensor:
        f = self._where.get(name)
        if f is None:
            raise ValueError(f"the checkpoint has no tensor {name!r}.")
        return f.get_tensor(name)

    def int_weight(self, prefix: str, out_features: int, in_features: int) -> IntWeight:
        """Layer `prefix`'s integers, checked against its [out_features, in_features] shape."""
        if out_features % 8 or in_features % 8:
            raise ValueError(f"{prefix}: {out_features}x{in_features} is not a multiple of 8.")
        qweight, qzeros = self._raw(prefix + ".qweight"), self._raw(prefix + ".qzeros")
        scales = self._raw(prefix + ".scales")
        gs = in_features if self.quant.group_size == -1 else self.quant.group_size
        groups = -(-in_features // gs)
        awq = self.quant.method == "awq"
        expect = {
            "qweight": (in_features, out_features // 8)
            if awq
            else (in_features // 8, out_features),
            "qzeros": (groups, out_features // 8),
            "scales": (groups, out_features),
        }
        for key, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
            if tuple(t.shape) != expect[key]:
                raise ValueError(
                    f"{prefix}.{key} has shape {tuple(t.shape)}, expected {expect[key]} "
                    f"for a {out_features}x{in_features} {self.quant.method} layer."
                )
        zeros = _unpack_cols(qzeros, awq).to(torch.int32) + self.quant.zero_offset
        if awq:
            q = _unpack_cols(qweight, awq=True).t()  # [out, in]
            g_idx = torch.arange(in_features) // gs
        else:
            q = _unpack_cols(qweight.t().contiguous())  # [out, in]
            name = prefix + ".g_idx"
            if name in self._where:
                g_idx = self._raw(name).to(torch.int64)
            elif self.quant.desc_act:
                raise ValueError(f"the checkpoint has no tensor {name!r} (desc_act is true).")
            else:
                g_idx = torch.arange(in_features) // gs
            if g_idx.shape != (in_features,) or int(g_idx.min()) < 0:
                raise ValueError(f"{name} must hold {in_features} group numbers >= 0.")
        if int(g_idx.max()) >= scales.shape[0]:
            raise ValueError(f"{prefix}: g_idx names a group past the {scales.shape[0]} stored.")
        return IntWeight(q.contiguous(), zeros, scales.float(), g_idx)

    def get(self, name: str, shape: tuple[int, ...], shard: Shard) -> torch.Tensor:
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and self.is_quantized(prefix) and len(shape) == 2:
            t = self.int_weight(prefix, shape[0], shape[1]).dequantized()
        else:
            t = self._raw(name).float()
        if shard is None:
            return t
        dim, start, stop = shard
        start, stop = min(start, t.shape[dim]), min(stop, t.shape[dim])
        return t.narrow(dim, start, stop - start).contiguous()


def read_quant_config(directory: str) -> HFQuantConfig | None:
    """The checked quantization_config of `directory`'s config.json (None when it has none)."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return HFQuantConfig.parse(json.load(f).get("quantization_config"))


# ------------------------------------------------------------------------------ the kernels' path


def q4_z_blocks(q: torch.Tensor, d: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """kernels_cpu Q4_Z blocks (uint8, rows of in/32 blocks) of q [out, in] with d, z [out, in/32].

    A block: fp16 d, uint16 z, then 16 bytes whose low nibbles are values 0-15 and high
    nibbles values 16-31 (GGUF's Q4 order); value i is (q_i - z) * d.
    """
    out, k = q.shape
    nb = k // ops.QK
    qb = q.to(torch.uint8).reshape(out, nb, 2, 16)
    raw = torch.empty(out, nb, ops.BLOCK_BYTES[ops.Q4_Z], dtype=torch.uint8)
    raw[..., 4:] = qb[:, :, 0] | (qb[:, :, 1] << 4)
    raw[..., :2] = d.to(torch.float16).contiguous().view(torch.uint8).view(out, nb, 2)
    raw[..., 2:4] = z.to(torch.int16).contiguous().view(torch.uint8).view(out, nb, 2)
    return raw.reshape(-1)


class ActOrderLinear(nn.Module):
    """A quantized layer whose input columns are stored sorted by group (GPTQ desc_act).

    y = W x = W[:, perm] x[perm]: the activations are permuted to the stored column order.
    """

    perm: torch.Tensor

    def __init__(self, inner: QuantizedLinear, perm: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("perm", perm.to(torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.index_select(-1, self.perm))


class ConcatLinear(nn.Module):
    """A fused layer (q/k/v, gate/up) whose parts cannot share one permuted input: each part
    runs on its own and the outputs are concatenated, as the fused layer's would be."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def _blocks_of(w: IntWeight) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(Q4_Z blocks, input permutation or None) of one layer; None when groups cut blocks or
    a scale is no fp16 value (bf16 or fp32 scales of a checkpoint that wrote them so)."""
    if not torch.equal(w.scales.half().float(), w.scales):
        return None
    perm = None
    g = w.g_idx
    if bool((g[1:] < g[:-1]).any()):  # desc_act: sort the columns by group
        perm = torch.argsort(g, stable=True)
        g = g[perm]
    gb = g.view(-1, ops.QK)
    if not bool((gb == gb[:, :1]).all()):
        return None  # a block of 32 would span two groups
    gb = gb[:, 0]
    q = w.q if perm is None else w.q.index_select(1, perm)
    return q4_z_blocks(q.contiguous(), w.scales[gb].t(), w.zeros[gb].t()), perm


def _fused(source: HFQuantWeights, parts: list[tuple[str, int]], k: int, what: str) -> nn.Module:
    """One layer of our model from checkpoint layers `parts` ((prefix, out_features)) of k inputs."""
    stored = [source.is_quantized(p) for p, _ in parts]
    built = None
    if all(stored) and k % ops.QK == 0:
        built = [_blocks_of(source.int_weight(p, n, k)) for p, n in parts]
    if built is None or any(b is None for b in built):
        if not any(stored):
            pass  # stored plain (modules_to_not_convert): nothing to say
        elif not all(stored):
            logger.info("%s: its parts are stored partly quantized: dequantized", what)
        else:
            logger.info(
                "%s: no exact Q4_Z mapping (groups of 32 inputs and fp16 scales needed): dequantized",
                what,
            )
        plain = Linear(k, sum(n for _, n in parts))
        plain.weight.data = torch.cat([source.get(p + ".weight", (n, k), None) for p, n in parts])
        return plain
    blocks = [b for b in built if b is not None]
    perms = [perm for _, perm in blocks]
    first = perms[0]
    same = all(
        (p is None and first is None)
        or (p is not None and first is not None and torch.equal(p, first))
        for p in perms
    )
    if same:
        n = sum(n for _, n in parts)
        layer = QuantizedLinear(torch.cat([b for b, _ in blocks]), ops.Q4_Z, k, n)
        return layer if first is None else ActOrderLinear(layer, first)
    logger.info("%s: its parts' g_idx differ: each part permutes its own input", what)
    mods: list[nn.Module] = []
    for (b, perm), (_, n) in zip(blocks, parts, strict=True):
        part = QuantizedLinear(b, ops.Q4_Z, k, n)
        mods.append(part if perm is None else ActOrderLinear(part, perm))
    return ConcatLinear(mods)


_LINEARS = ("qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight", "down_proj.weight")


@torch.no_grad()
def load_hf_quantized(
    model: LlamaForCausalLM, source: HFQuantWeights, weight_dtype: torch.dtype
) -> None:
    """Put an AWQ/GPTQ checkpoint into `model` (CPU, tp_size 1): its layers as Q4_Z blocks.

    The embedding, norms and LM head are stored unquantized: loaded as load_weights would,
    rounded to weight_dtype. The caller moves the model to its compute dtype.
    """
    cfg = model.config
    if model.tp.tp_size != 1:
        raise ValueError("quantized AWQ/GPTQ layers do not support tensor parallelism.")
    shapes, params = hf_weight_shapes(cfg), dict(model.named_parameters())
    for name, tensors in model._weight_map().items():
        if name.endswith(_LINEARS):
            continue
        got = [source.get(hf, shapes[hf], shard).to(weight_dtype) for hf, shard in tensors]
        loaded = torch.cat(got) if len(got) > 1 else got[0]
        if tuple(loaded.shape) != tuple(params[name].shape):
            raise ValueError(
                f"checkpoint tensor {tensors[0][0]!r} has shape {tuple(loaded.shape)}, "
                f"expected {tuple(params[name].shape)}."
            )
        params[name].copy_(loaded)
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv, inter = cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.intermediate_size
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [(p + "self_attn.q_proj", q), (p + "self_attn.k_proj", kv)]
        qkv.append((p + "self_attn.v_proj", kv))
        gate_up = [(p + "mlp.gate_proj", inter), (p + "mlp.up_proj", inter)]
        for owner, attr, parts, k in (
            (attn, "qkv_proj", qkv, h),
            (attn, "o_proj", [(p + "self_attn.o_proj", h)], q),
            (mlp, "gate_up_proj", gate_up, h),
            (mlp, "down_proj", [(p + "mlp.down_proj", h)], inter),
        ):
            setattr(owner, attr, _fused(source, parts, k, f"layer {i} {attr}"))
    model.pack_weights()  # the LM head (and any dequantized layer) as the plain path has them
