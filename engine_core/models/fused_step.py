"""When a Llama step runs its decoder layers in one kernels_cpu call (kernels_cpu/model_step).

The quantized CPU path's steps: every linear a QuantizedLinear (the GGUF blocks, or
--quantization int8/int4), fp32 activations, one process, the native attention backend,
and a step with at most GEMM_MAX_ROWS tokens (without the bf16 GEMM kernel, fewer than the
layers' bf16_min_rows) whose attention rows are single-query (decode rows, and the short
rows of drafts that torch_paged.py splits per token) or, where kernels_cpu's prefill
attention takes the model's shape (an AVX-512 build), prefill rows as well. The call
runs the same kernels as the layers' Python in the same order, so its hidden states are the
Python path's bit for bit (tests/engine_core/worker/test_fused_step.py); it saves the
interpreter and dispatch time around them (~30% of a single-stream step on this CPU).
`RINGSERVE_FUSED_STEP=0` turns it off.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch

from engine_core.models.quant_layers import GEMM_MAX_ROWS, QuantizedLinear
from kernels_cpu import ops

if TYPE_CHECKING:
    from engine_core.attention.torch_paged import AttentionMetadata
    from engine_core.models.llama import LlamaForCausalLM
    from kernels_cpu.model_step import LlamaLayers

logger = logging.getLogger(__name__)


def build(model: LlamaForCausalLM) -> LlamaLayers | None:
    """The model's layers as one call, or None (with the reason logged) where it cannot run."""
    why = _why_not(model)
    if why is not None:
        logger.debug("decoder layers run op by op: %s", why)
        return None
    from kernels_cpu.model_step import LayerWeights, LlamaLayers

    cfg, layers = model.config, []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(
            LayerWeights(
                input_norm=layer.input_layernorm.weight.data,
                post_norm=layer.post_attention_layernorm.weight.data,
                qkv=(attn.qkv_proj.qweight.data, attn.qkv_proj.wtype),
                o=(attn.o_proj.qweight.data, attn.o_proj.wtype),
                gate_up=(mlp.gate_up_proj.qweight.data, mlp.gate_up_proj.wtype),
                down=(mlp.down_proj.qweight.data, mlp.down_proj.wtype),
            )
        )
    # With bf16 matmuls (QuantizedLinear.matmul_dtype) the call multiplies the same steps in
    # bf16 with the same kernel; without that kernel it leaves them to the Python path.
    bf16 = any(lin.matmul_dtype != torch.float32 for lin in _linears(model))
    min_rows = min(lin.bf16_min_rows for lin in _linears(model))
    bf16_kernel = bf16 and ops.has_bf16_gemm()
    first = model.layers[0].self_attn
    plan = LlamaLayers(
        layers,
        model.norm.weight.data,
        hidden=cfg.hidden_size,
        heads=first.num_heads,
        kv_heads=first.num_kv_heads,
        head_dim=first.head_dim,
        intermediate=model.tp.intermediate_size,
        eps=model.norm.eps,
        bf16_min_rows=min_rows if bf16_kernel else 0,
    )
    plan.max_rows = min_rows - 1 if bf16 and not bf16_kernel else GEMM_MAX_ROWS
    # Steps with prefill rows too where kernels_cpu's prefill attention takes the shape
    # (plan.takes_prefills), as the Python path's attention then runs it.
    logger.info(
        "decoder layers run as one kernels_cpu call on decode steps%s",
        " and prefill steps" if plan.takes_prefills else "",
    )
    return plan


def _linears(model: LlamaForCausalLM) -> list[QuantizedLinear]:
    return [
        lin
        for layer in model.layers
        for lin in (
            layer.self_attn.qkv_proj,
            layer.self_attn.o_proj,
            layer.mlp.gate_up_proj,
            layer.mlp.down_proj,
        )
    ]


def _why_not(model: LlamaForCausalLM) -> str | None:
    if os.environ.get("RINGSERVE_FUSED_STEP", "1") == "0":
        return "RINGSERVE_FUSED_STEP=0"
    if model.tp.tp_size != 1:
        return "tensor parallelism"
    if model.attn_backend.name != "native" or model.norm.weight.device.type != "cpu":
        return "not the CPU's native attention backend"
    eps = {model.norm.eps}
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if any(type(lin) is not QuantizedLinear for lin in linears):
            return "not every linear layer is a QuantizedLinear"
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if any(w.dtype != torch.float32 for w in norms):
            return "activations are not float32"
        eps |= {layer.input_layernorm.eps, layer.post_attention_layernorm.eps}
    if len(eps) != 1:
        return "the norms' epsilons differ"
    return None if ops.available() else "kernels_cpu is not built"


def applies(meta: AttentionMetadata, h: torch.Tensor, plan: LlamaLayers) -> bool:
    """Whether this step's rows fit the one call (see the module's docstring)."""
    return (
        h.dtype == torch.float32
        and 0 < h.shape[0] <= plan.max_rows
        and h.is_contiguous()
        and (not meta.prefills or plan.takes_prefills)
    )


def run(
    plan: LlamaLayers,
    h: torch.Tensor,
    kv_caches: torch.Tensor,
    meta: AttentionMetadata,
    rope: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The final norm's output for the step's embeddings h (overwritten)."""
    groups = [(g.start, g.end, g.block_ids, g.bias_rows) for g in meta.decode_groups]
    prefills = [(p.query_start, p.query_len, p.num_computed, p.block_ids) for p in meta.prefills]
    return plan.run(h, kv_caches, meta.slot_mapping, rope[0], rope[1], groups, prefills)
