"""Weight-only int4 linear layers for CUDA: GGUF Q4_0 / Q4_1 blocks and RTN int4, group 32.

Torch's tinygemm op (`torch._weight_int4pack_mm`, sm80+) dequantizes each 4-bit value as
`(q - 8) * scale + zero` with one bf16 (scale, zero) pair per group of `group_size` inputs,
then multiplies in bf16 with fp32 accumulation. GGUF's blocks map onto it group for group:
Q4_1's `d * q + m` is `(q - 8) * d + (m + 8 d)`, Q4_0's `d * (q - 8)` has zero 0. The op takes
bf16 activations and bf16 scales only, so GGUF's fp16 `d` (and `m + 8 d`) are rounded to
bf16 here: that rounding is the one loss against the file (README: the measured size).

Q8_0 has no exact home: torch's CUDA `_weight_int8pack_mm` takes one scale per output row
(Q8_0 has one per 32 inputs: a requantization would lose) and is a plain one-thread-per-output
kernel, slower than cuBLAS on bf16. Q8_0 tensors (the default model's tied embedding and LM
head among them) and any other type are dequantized to the compute dtype, with a log line;
so is `--quantization int8`. With tensor parallelism each rank packs its own rows (or whole
32-column groups) of the blocks, as load_weights reads its shard.

The same layer runs on a CPU with torch's `_for_cpu` twins of the ops (the tests' path; the
CPU engine uses kernels_cpu's block GEMM instead, models/quant_layers.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from engine_core.models.gguf_file import GGUFTensor
from engine_core.models.llama import LlamaForCausalLM, Shard
from kernels_cpu.ops import BLOCK_BYTES, Q4_0, Q4_1, Q8_0

if TYPE_CHECKING:
    from engine_core.models.loader import GGUFWeights  # loader imports this module

logger = logging.getLogger(__name__)

GROUP_SIZE = 32  # GGUF's block length, one of the op's group sizes (32, 64, 128, 256)
_DECODED = (Q4_0, Q4_1, Q8_0)  # the GGUF types decode_blocks takes (kernels_cpu's ids)
INT4_TYPES = (Q4_0, Q4_1)


def decode_blocks(
    raw: torch.Tensor, wtype: int, in_features: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q, d, m) of GGUF block rows `raw` (uint8 [rows, in/32 * block bytes]), on its device.

    q is int32 [rows, in] (0..15 for Q4_0/Q4_1, -128..127 for Q8_0), d and m fp32 [rows, in/32]
    (m is None for Q4_0 and Q8_0). The weight is d*q + m (Q4_1), d*(q - 8) (Q4_0), d*q (Q8_0).
    """
    if wtype not in _DECODED:
        raise ValueError(f"ggml type {wtype} has no block decoder here.")
    if in_features % GROUP_SIZE:
        raise ValueError(f"in_features must be a multiple of {GROUP_SIZE}, got {in_features}.")
    nb = in_features // GROUP_SIZE
    blocks = raw.reshape(raw.shape[0], nb, BLOCK_BYTES[wtype])

    def f16(col: int) -> torch.Tensor:
        return blocks[..., col : col + 2].contiguous().view(torch.float16)[..., 0].float()

    d = f16(0)
    if wtype == Q8_0:
        q = blocks[..., 2:].contiguous().view(torch.int8).to(torch.int32)
        return q.reshape(raw.shape[0], in_features), d, None
    m = f16(2) if wtype == Q4_1 else None
    qs = blocks[..., 4 if wtype == Q4_1 else 2 :].to(torch.int32)
    # Element j of a block is qs[j]'s low nibble, element j + 16 its high one.
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1)
    return q.reshape(raw.shape[0], in_features), d, m


def dequantize_blocks(raw: torch.Tensor, wtype: int, in_features: int) -> torch.Tensor:
    """The fp32 weight [rows, in] of GGUF block rows (gguf's own dequantization, in torch)."""
    q, d, m = decode_blocks(raw, wtype, in_features)
    qf = q.float() - (8.0 if wtype == Q4_0 else 0.0)
    w = qf.view(q.shape[0], -1, GROUP_SIZE) * d.unsqueeze(-1)
    if m is not None:
        w = w + m.unsqueeze(-1)
    return w.reshape(q.shape)


def _inner_k_tiles(in_features: int) -> int:
    """The op's inner k-tiles: the largest of 8, 4, 2 dividing in/16 (16-byte loads at 8)."""
    for tiles in (8, 4, 2):
        if (in_features // 16) % tiles == 0:
            return tiles
    raise ValueError(f"in_features {in_features} is not a multiple of 32.")


class Int4Linear(nn.Module):
    """y = x @ W.T, W = (q - 8) * scale + zero per group of 32 inputs, q 4-bit, in tinygemm's layout.

    The packed weight and the bf16 scales are integer tensors (the scales' bits as int16), so
    `Module.to(dtype)` leaves them alone. Activations of another dtype are rounded to bf16 for
    the op and the output converted back.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        super().__init__()
        out_features, in_features = q.shape
        groups = in_features // GROUP_SIZE
        if in_features % GROUP_SIZE or out_features % 8:
            raise ValueError(
                f"an int4 weight needs in_features % {GROUP_SIZE} == 0 and out_features % 8 "
                f"== 0, got {out_features}x{in_features}."
            )
        if scale.shape != (out_features, groups) or zero.shape != scale.shape:
            raise ValueError(f"scale and zero must be [{out_features}, {groups}].")
        self.in_features, self.out_features = in_features, out_features
        self.group_size = GROUP_SIZE
        q = q.to(torch.int32)
        if q.device.type == "cpu":
            packed = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
        else:  # [out, in/2] bytes, the even input in the high nibble
            nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous()
            packed = torch._convert_weight_to_int4pack(nibbles, _inner_k_tiles(in_features))
        # [groups, out, 2] (scale, zero) pairs, as the op reads them.
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.qweight = nn.Parameter(packed, requires_grad=False)
        self.scales_and_zeros = nn.Parameter(sz.view(torch.int16), requires_grad=False)

    @classmethod
    def from_gguf_blocks(cls, raw: torch.Tensor, wtype: int, in_features: int) -> Int4Linear:
        """The layer of Q4_0 / Q4_1 block rows (uint8 [out, in/32 * block bytes])."""
        if wtype not in INT4_TYPES:
            raise ValueError(f"ggml type {wtype} is not a 4-bit block type (Q4_0 or Q4_1).")
        q, d, m = decode_blocks(raw, wtype, in_features)
        zero = torch.zeros_like(d) if m is None else m + 8.0 * d  # fp32: exact, then bf16
        return cls(q, d, zero)

    @classmethod
    def quantize_rtn(cls, weight: torch.Tensor) -> Int4Linear:
        """Round-to-nearest asymmetric int4 of `weight` [out, in], group 32 (Q4_1's scheme).

        scale = (max - min) / 15 and zero are rounded to bf16 first and q chosen against the
        rounded pair, so q is the nearest code for the values the kernel will see.
        """
        out_features, in_features = weight.shape
        if in_features % GROUP_SIZE:
            raise ValueError(
                f"in_features must be a multiple of {GROUP_SIZE} to quantize, got {in_features}."
            )
        w = weight.detach().float().reshape(out_features, -1, GROUP_SIZE)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((hi - lo) / 15.0).to(torch.bfloat16).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group
        zero = (lo + 8.0 * scale).to(torch.bfloat16).float()
        q = torch.round((w - zero.unsqueeze(-1)) / scale.unsqueeze(-1)) + 8.0
        q = q.clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
        return cls(q, scale, zero)

    def dequantized(self) -> torch.Tensor:
        """The weight the op multiplies by, fp32 [out, in]: its bf16 fma of (q - 8), scale, zero."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.qweight.device)
        return self._mm(eye).t().float()  # the op applied to the identity: its own rounding

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        sz = self.scales_and_zeros.view(torch.bfloat16)
        if self.qweight.device.type == "cpu":
            return torch._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size, sz)
        return torch._weight_int4pack_mm(x, self.qweight, self.group_size, sz)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:  # the CUDA kernel would launch an empty grid
            return x.new_empty(*lead, self.out_features)
        if dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        y = self._mm(x2.contiguous()).reshape(*lead, self.out_features)
        return y if dtype == torch.bfloat16 else y.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}"
        )


# ------------------------------------------------------------------------------ the model


def applies(quantization: str | None, device: torch.device, gguf: bool) -> bool:
    """Whether load_model hands the model to quantize_model: a CUDA device, and a GGUF not
    loaded with --quantization none, or --quantization int4/int8 of a plain checkpoint."""
    if device.type != "cuda":
        return False
    return quantization in ("int4", "int8") or (gguf and quantization != "none")


def quantize_model(
    model: LlamaForCausalLM, quantization: str | None, gguf: GGUFWeights | None
) -> None:
    """Swap `model`'s loaded dense linear layers for Int4Linear ones in place.

    A GGUF's Q4_0 / Q4_1 layers are packed from the file's own blocks, each tensor-parallel
    rank its own rows or columns of them; `--quantization int4` rounds the loaded weights (as
    loaded: in the compute dtype) to nearest, group 32. The embedding stays dense; a tied LM
    head is packed from the embedding's blocks (or values).
    """
    dtype, device = model.norm.weight.dtype, model.norm.weight.device
    torch_version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if torch_version < (2, 6):  # older torch packed int32 codes and had no _for_cpu twins
        logger.info(
            "weights kept in %s: the int4 layers need torch 2.6+, this is %s",
            str(dtype).removeprefix("torch."),
            torch.__version__,
        )
        return
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        logger.info(
            "weights kept in %s: torch's int4 CUDA kernel needs compute capability 8.0+, "
            "this GPU has %d.%d",
            str(dtype).removeprefix("torch."),
            *torch.cuda.get_device_capability(device),
        )
        return
    if gguf is not None:
        if quantization in ("int4", "int8"):
            logger.info(
                "--quantization %s is for plain checkpoints: the GGUF keeps its own types",
                quantization,
            )
        done = _load_gguf_int4(model, gguf)
    elif quantization == "int4":
        done = 0
        for owner, name in _linears(model):
            weight = getattr(owner, name).weight
            # The op's rows come in 8s and its groups are 32 inputs: else kept dense.
            if weight.shape[0] % 8 == 0 and weight.shape[1] % GROUP_SIZE == 0:
                setattr(owner, name, Int4Linear.quantize_rtn(weight))
                done += 1
    else:
        logger.info(
            "--quantization int8 on CUDA: weights kept in %s (torch's CUDA int8 weight-only "
            "op takes one scale per row and is slower than the dense matmul)",
            str(dtype).removeprefix("torch."),
        )
        return
    if done and dtype != torch.bfloat16:
        logger.info(
            "int4 layers take bf16 activations: the %s activations are rounded to bf16 at each "
            "of the %d int4 linear layers (--dtype bfloat16 avoids the casts)",
            str(dtype).removeprefix("torch."),
            done,
        )


# (the module holding a linear layer, the layer's attribute name)
_Slot = tuple[Any, str]
_LINEAR_PATHS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def _linears(model: LlamaForCausalLM) -> list[_Slot]:
    """(owner, attribute) of every linear layer, the LM head last."""
    out: list[_Slot] = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out += [(attn, "qkv_proj"), (attn, "o_proj"), (mlp, "gate_up_proj"), (mlp, "down_proj")]
    return out + [(model, "lm_head")]


def _shard_blocks(tensor: GGUFTensor, num_heads: int | None, shard: Shard) -> np.ndarray | None:
    """This rank's raw block rows of a 2-D tensor (q/k rows back in rotate-half order, which
    moves whole rows); None when a column shard cuts through a block."""
    raw = np.asarray(tensor.data).reshape(tensor.shape[0], -1)
    if num_heads is not None:
        rows, cols = raw.shape
        raw = raw.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2)
        raw = raw.reshape(rows, cols)
    if shard is None:
        return raw
    dim, start, stop = shard
    start, stop = min(start, tensor.shape[dim]), min(stop, tensor.shape[dim])
    if dim == 0:
        return raw[start:stop]
    if start % GROUP_SIZE or stop % GROUP_SIZE:
        return None
    bb = BLOCK_BYTES[tensor.tensor_type]
    return raw[:, start // GROUP_SIZE * bb : stop // GROUP_SIZE * bb]


def _load_gguf_int4(model: LlamaForCausalLM, gguf: GGUFWeights) -> int:
    """Pack every layer whose GGUF parts are all Q4_0 or all Q4_1; the number packed."""
    import gguf as gguf_lib

    cfg, tensors = model.config, gguf.file.tensors
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}  # the GGUF's permuted rows
    dense: dict[str, int] = {}
    packed = 0
    # The model's own map of which checkpoint rows and columns this rank holds.
    for param, parts in model._weight_map().items():
        path = param.removesuffix(".weight")
        if path != "lm_head" and not path.endswith(_LINEAR_PATHS):
            continue
        owner_path, _, name = path.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        layer = getattr(owner, name)
        ts = [(tensors[gguf.gguf_name(hf)], heads.get(hf.split(".")[-2]), s) for hf, s in parts]
        types = {t.tensor_type for t, _, _ in ts}
        wtype = ts[0][0].tensor_type
        raw: np.ndarray | None = None
        if len(types) == 1 and wtype in INT4_TYPES and layer.out_features % 8 == 0:
            shards = [_shard_blocks(t, h, s) for t, h, s in ts]
            whole = [r for r in shards if r is not None]
            if len(whole) == len(shards):
                raw = np.concatenate(whole)
        if raw is None:
            key = "+".join(gguf_lib.GGMLQuantizationType(t).name for t in sorted(types))
            dense[key] = dense.get(key, 0) + 1
            continue
        # A padded vocabulary's last rows: zero bytes, d = m = 0, weights 0 (as load_weights).
        pad = np.zeros((layer.out_features - raw.shape[0], raw.shape[1]), dtype=np.uint8)
        blocks = torch.from_numpy(np.concatenate([raw, pad])).to(model.norm.weight.device)
        setattr(owner, name, Int4Linear.from_gguf_blocks(blocks, wtype, layer.in_features))
        packed += 1
    if dense:
        what = ", ".join(f"{n} of type {k}" for k, n in sorted(dense.items()))
        logger.info(
            "GGUF on CUDA: %d linear layers run int4, %s kept dequantized to %s "
            "(no exact int4 mapping)",
            packed,
            what,
            str(model.norm.weight.dtype).removeprefix("torch."),
        )
    return packed
