"""Loads a GGUF file's weights into quantized layers, memory-mapped, without dequantizing.

Q4_0, Q4_1 and Q8_0 tensors map exactly onto kernels_cpu's block formats: o_proj and
down_proj (and an untied LM head) are views of the mapped file; q/k/v and gate/up are fused
by concatenating their block rows (q and k rows reordered back to rotate-half order, which
moves whole rows, so the blocks stay bit-identical). The token embedding dequantizes the
rows it looks up and, when tied, is the LM head's own blocks. Any other type (Q4_K, Q6_K,
F16, ...) or a fused layer whose parts differ in type is dequantized to an fp32 Linear, with
a log line naming the tensor and its type.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from engine_core.models.gguf_file import GGUFFile, GGUFTensor
from engine_core.models.layers import Linear
from engine_core.models.llama import LlamaForCausalLM
from engine_core.models.quant_layers import QuantizedEmbedding, QuantizedLinear, quantize_rtn
from kernels_cpu import ops

logger = logging.getLogger(__name__)

KERNEL_TYPES = (ops.Q4_0, ops.Q4_1, ops.Q8_0)  # ggml type ids with an exact kernel mapping


def _type_name(qtype: int) -> str:
    import gguf

    return gguf.GGMLQuantizationType(qtype).name


def _rotate_half_rows(a: np.ndarray, num_heads: int | None) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved rotary pairs): whole rows move."""
    if num_heads is None:
        return a
    rows, cols = a.shape
    return a.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _blocks(tensor: GGUFTensor, num_heads: int | None = None) -> np.ndarray:
    """The tensor's raw block rows [rows, row_bytes]; q/k rows back in rotate-half order."""
    raw = np.asarray(tensor.data).reshape(tensor.shape[0], -1)
    return _rotate_half_rows(raw, num_heads)


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    # A view of the read-only mapping stays read-only in practice: nothing writes weights.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _dequantized(tensor: GGUFTensor, num_heads: int | None) -> torch.Tensor:
    w = tensor.dequantize()
    if len(tensor.shape) == 2:
        w = _rotate_half_rows(w, num_heads)
    return torch.from_numpy(np.array(w, dtype=np.float32))


def _linear(parts: list[tuple[GGUFTensor, int | None]], what: str) -> torch.nn.Module:
    """One (fused) linear layer from GGUF tensors, each with its heads to unpermute or None."""
    types = {t.tensor_type for t, _ in parts}
    in_features = parts[0][0].shape[1]
    out_features = sum(t.shape[0] for t, _ in parts)
    if len(types) == 1 and parts[0][0].tensor_type in KERNEL_TYPES:
        wtype = parts[0][0].tensor_type
        raw = [_blocks(t, heads) for t, heads in parts]
        if len(raw) == 1 and raw[0].flags.c_contiguous:
            blocks = _as_tensor(raw[0])  # a view of the mapped file
        else:
            blocks = torch.from_numpy(np.concatenate(raw))
        return QuantizedLinear(blocks, wtype, in_features, out_features)
    if types != {0}:  # F32 (type 0) is already what the Linear holds: nothing to say
        names = ", ".join(f"{t.name} ({_type_name(t.tensor_type)})" for t, _ in parts)
        logger.info("%s: no quantized kernel for %s: dequantized to float32", what, names)
    layer = Linear(in_features, out_features)
    layer.weight.data = torch.cat([_dequantized(t, heads) for t, heads in parts])
    layer.pack()
    return layer


def load_gguf_quantized(
    model: LlamaForCausalLM, gguf_file: GGUFFile, compute_dtype: torch.dtype
) -> None:
    """Put the GGUF's weights into `model` (built on the CPU, tp_size 1) as quantized layers."""
    cfg = model.config
    if model.tp.tp_size != 1:
        raise ValueError("quantized GGUF layers do not support tensor parallelism.")
    tensors = gguf_file.tensors

    def get(name: str) -> GGUFTensor:
        if name not in tensors:
            raise ValueError(f"the GGUF file has no tensor {name!r}.")
        return tensors[name]

    def norm(param: torch.nn.Parameter, name: str) -> None:
        t = get(name)
        if t.shape != tuple(param.shape):
            raise ValueError(f"GGUF tensor {name!r} has shape {t.shape}, expected {param.shape}.")
        param.data.copy_(torch.from_numpy(np.array(t.dequantize(), dtype=np.float32)))

    hd = cfg.head_dim
    expect = {
        "attn_q": (cfg.num_heads * hd, cfg.hidden_size),
        "attn_k": (cfg.num_kv_heads * hd, cfg.hidden_size),
        "attn_v": (cfg.num_kv_heads * hd, cfg.hidden_size),
        "attn_output": (cfg.hidden_size, cfg.num_heads * hd),
        "ffn_gate": (cfg.intermediate_size, cfg.hidden_size),
        "ffn_up": (cfg.intermediate_size, cfg.hidden_size),
        "ffn_down": (cfg.hidden_size, cfg.intermediate_size),
    }
    for i, layer in enumerate(model.layers):
        w = {}
        for short, shape in expect.items():
            t = get(f"blk.{i}.{short}.weight")
            if t.shape != shape:
                raise ValueError(f"GGUF tensor {t.name!r} has shape {t.shape}, expected {shape}.")
            w[short] = t
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [(w["attn_q"], cfg.num_heads), (w["attn_k"], cfg.num_kv_heads), (w["attn_v"], None)]
        attn.qkv_proj = _linear(qkv, f"layer {i} qkv_proj")
        attn.o_proj = _linear([(w["attn_output"], None)], f"layer {i} o_proj")
        mlp.gate_up_proj = _linear(
            [(w["ffn_gate"], None), (w["ffn_up"], None)], f"layer {i} gate_up_proj"
        )
        mlp.down_proj = _linear([(w["ffn_down"], None)], f"layer {i} down_proj")
        norm(layer.input_layernorm.weight, f"blk.{i}.attn_norm.weight")
        norm(layer.post_attention_layernorm.weight, f"blk.{i}.ffn_norm.weight")
    norm(model.norm.weight, "output_norm.weight")

    embed = get("token_embd.weight")
    if embed.shape != (cfg.vocab_size, cfg.hidden_size):
        raise ValueError(f"GGUF tensor 'token_embd.weight' has shape {embed.shape}.")
    if embed.tensor_type in KERNEL_TYPES:
        table = _linear([(embed, None)], "token embedding")
        del model.embed_tokens  # the Parameter makes way for the module
        model.embed_tokens = QuantizedEmbedding(table, compute_dtype)
    else:
        logger.info(
            "token embedding: no quantized kernel for %s: dequantized to float32",
            _type_name(embed.tensor_type),
        )
        model.embed_tokens.data = _dequantized(embed, None)
        table = Linear(cfg.hidden_size, cfg.vocab_size)
        table.weight = model.embed_tokens  # one tensor, as in the checkpoint
    if cfg.tie_word_embeddings or "output.weight" not in tensors:
        model.lm_head = table
    else:
        model.lm_head = _linear([(get("output.weight"), None)], "lm_head")
    model.to(compute_dtype)


def quantize_model_rtn(model: LlamaForCausalLM, quantization: str) -> None:
    """Replace `model`'s fp32 linear layers (loaded, unpacked) by RTN-quantized ones in place.

    int8: Q8_0 blocks; int4: Q4_1 blocks (group 32, with a minimum: finer than the usual
    group-128 int4, and what the kernels run). The embedding stays float (a lookup reads
    few rows); a tied LM head is quantized from it.
    """
    wtype = {"int8": ops.Q8_0, "int4": ops.Q4_1}[quantization]
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for owner, name in (
            (attn, "qkv_proj"),
            (attn, "o_proj"),
            (mlp, "gate_up_proj"),
            (mlp, "down_proj"),
        ):
            setattr(owner, name, quantize_rtn(getattr(owner, name).weight, wtype))
    head = model.embed_tokens if model.config.tie_word_embeddings else model.lm_head.weight
    model.lm_head = quantize_rtn(head, wtype)
