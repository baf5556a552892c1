"""Test helpers: AWQ (GEMM) and GPTQ checkpoints in their published layouts, from the default
model's weights (its GGUF dequantized to fp32), and the plain fp32 checkpoint of the same
dequantized weights.

The packers follow AutoAWQ's `pack` (WQLinear_GEMM, awq/utils/packing_utils.py) and
AutoGPTQ's `QuantLinear.pack` (qlinear_cuda_old / qlinear_exllama) word by word, written
here independently of the loader's unpacking: eight 4-bit values an int32, value j at bits
4j..4j+3; AWQ puts output columns 8c + (0, 2, 4, 6, 1, 3, 5, 7)[j] in word c of a row of
qweight and qzeros; GPTQ packs qweight along the input (rows 8r + j) and qzeros along the
output, v1 storing z - 1.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import save_file

from engine_core.model_files import default_model_path
from engine_core.models.gguf_file import GGUFFile
from engine_core.models.llama import hf_weight_shapes
from engine_core.models.loader import GGUFWeights
from engine_core.models.model_config import ModelConfig

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass
class Quantized:
    """One layer quantized: integers before packing, and their dequantized reference."""

    q: torch.Tensor  # int64 [out, in], 0..15
    zeros: torch.Tensor  # int64 [groups, out]
    scales: torch.Tensor  # float16 [groups, out]
    g_idx: torch.Tensor  # int64 [in]

    def reference(self) -> torch.Tensor:
        """w[o, i] = (q[o, i] - z[g[i], o]) * s[g[i], o] in float32 (exact: a small integer
        times an fp16 value)."""
        z = self.zeros[self.g_idx].t().float()
        return (self.q.float() - z) * self.scales[self.g_idx].t().float()


def default_weights(num_layers: int, vocab: int | None = None) -> tuple[dict, ModelConfig]:
    """The default model's first `num_layers` layers as HF-named fp32 tensors, and its config."""
    gguf_file = GGUFFile.open(default_model_path())
    cfg = ModelConfig.from_gguf_fields(gguf_file.fields, set(gguf_file.tensors))
    source = GGUFWeights(gguf_file, cfg)
    shapes = hf_weight_shapes(cfg)
    keep = {f"model.layers.{i}." for i in range(num_layers)}
    tensors = {}
    for name, shape in shapes.items():
        if name.startswith("model.layers.") and not any(name.startswith(k) for k in keep):
            continue
        rows = vocab if vocab and name == "model.embed_tokens.weight" else None
        tensors[name] = source.get(name, shape, None if rows is None else (0, 0, rows))
    return tensors, cfg


def quantize(
    w: torch.Tensor, group_size: int, order: torch.Tensor | None, zero_min: int
) -> Quantized:
    """Round-to-nearest 4-bit with a zero point per (group, output row).

    order: the order the columns are quantized in (GPTQ desc_act; None: natural): column
    order[j] belongs to group j // group_size. zero_min: 1 for GPTQ v1 (z - 1 must fit 4 bits).
    """
    out, k = w.shape
    gs = k if group_size == -1 else group_size
    order = torch.arange(k) if order is None else order
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[order] = torch.arange(k) // gs
    groups = -(-k // gs)
    wt = w.t()[order].float().contiguous()  # [in, out], quantization order: groups are rows
    qt = torch.empty(k, out)  # integers, held in float32 until the end
    zeros = torch.empty(groups, out)
    scales = torch.empty(groups, out, dtype=torch.float16)
    for g in range(groups):
        wg = wt[g * gs : (g + 1) * gs]
        lo, hi = wg.amin(dim=0).clamp(max=0), wg.amax(dim=0).clamp(min=0)
        s = ((hi - lo) / 15).clamp(min=1e-6).half()
        sf = s.float()
        z = torch.round(-lo / sf).clamp_(zero_min, 15)
        qt[g * gs : (g + 1) * gs] = torch.round(wg / sf).add_(z).clamp_(0, 15)
        zeros[g], scales[g] = z, s
    q = torch.empty(out, k, dtype=torch.int64)
    q[:, order] = qt.t().long()
    return Quantized(q, zeros.long(), scales, g_idx)


def _to_int32(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.astype(np.uint32).view(np.int32).copy())


def pack_awq(qz: Quantized) -> dict[str, torch.Tensor]:
    """AutoAWQ's GEMM layout: qweight [in, out/8], qzeros [groups, out/8], scales [groups, out]."""
    intweight = qz.q.t().numpy().astype(np.uint64)  # [in, out]
    zeros = qz.zeros.numpy().astype(np.uint64)  # [groups, out]

    def pack(a: np.ndarray) -> np.ndarray:
        words = np.zeros((a.shape[0], a.shape[1] // 8), dtype=np.uint64)
        for col in range(a.shape[1] // 8):
            for i in range(8):
                words[:, col] |= a[:, col * 8 + AWQ_PACK_ORDER[i]] << np.uint64(i * 4)
        return words

    return {
        "qweight": _to_int32(pack(intweight)),
        "qzeros": _to_int32(pack(zeros)),
        "scales": qz.scales.clone(),
    }


def pack_gptq(qz: Quantized, v1: bool = True) -> dict[str, torch.Tensor]:
    """AutoGPTQ's layout: qweight [in/8, out], qzeros [groups, out/8], scales, g_idx [in]."""
    intweight = qz.q.t().numpy().astype(np.uint64)  # [in, out]
    qweight = np.zeros((intweight.shape[0] // 8, intweight.shape[1]), dtype=np.uint64)
    for row in range(qweight.shape[0]):
        for j in range(8):
            qweight[row] |= intweight[row * 8 + j] << np.uint64(4 * j)
    zeros = (qz.zeros.numpy() - (1 if v1 else 0)).astype(np.uint64) & np.uint64(0xF)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 8), dtype=np.uint64)
    for col in range(qzeros.shape[1]):
        for j in range(8):
            qzeros[:, col] |= zeros[:, col * 8 + j] << np.uint64(4 * j)
    return {
        "qweight": _to_int32(qweight),
        "qzeros": _to_int32(qzeros),
        "scales": qz.scales.clone(),
        "g_idx": qz.g_idx.to(torch.int32),
    }


def hf_config(cfg: ModelConfig, num_layers: int, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
        "hidden_act": "silu",
        "torch_dtype": "float16",
    }


def write_checkpoints(
    out_dir: str,
    method: str,
    group_size: int,
    desc_act: bool = False,
    num_layers: int = 2,
    vocab: int | None = 1024,
    v1: bool = True,
    same_order_per_input: bool = True,
    tokenizer: bool = False,
) -> tuple[str, str, dict[str, torch.Tensor]]:
    """(quantized dir, plain fp32 dir of its dequantized weights, HF name -> reference weight).

    method "awq" or "gptq"; desc_act: each input's columns quantized in a random order, the
    same for the layers sharing that input (q/k/v, gate/up) unless same_order_per_input is
    false. Norms and the embedding are fp16 in both (as published checkpoints hold them).
    """
    tensors, cfg = default_weights(num_layers, vocab)
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    gen = torch.Generator().manual_seed(0)
    quant: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}
    refs: dict[str, torch.Tensor] = {}
    order = None
    for name, t in tensors.items():
        prefix = name.removesuffix(".weight")
        if not prefix.endswith(LINEARS):
            quant[name] = t.half()
            plain[name] = t.half().float()
            continue
        if desc_act and (
            order is None
            or not same_order_per_input
            or prefix.endswith(("q_proj", "o_proj", "gate_proj", "down_proj"))
        ):
            order = torch.randperm(t.shape[1], generator=gen)
        qz = quantize(t, group_size, order if desc_act else None, 1 if method == "gptq" else 0)
        packed = pack_awq(qz) if method == "awq" else pack_gptq(qz, v1)
        quant |= {f"{prefix}.{k}": v for k, v in packed.items()}
        refs[name] = plain[name] = qz.reference()
    qdir, pdir = os.path.join(out_dir, "quantized"), os.path.join(out_dir, "plain")
    config = hf_config(cfg, num_layers, vocab)
    if method == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm"}
        qc["zero_point"] = True
    else:
        qc = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act}
        qc |= {"sym": False, "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    for d, ts, c in ((qdir, quant, config | {"quantization_config": qc}), (pdir, plain, config)):
        os.makedirs(d)
        save_file({k: v.contiguous() for k, v in ts.items()}, os.path.join(d, "model.safetensors"))
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(c, f)
        if tokenizer:
            from frontend.tokenizer import load_tokenizer

            load_tokenizer(None).save_pretrained(d)
    return qdir, pdir, refs
