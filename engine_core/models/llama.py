"""The Llama forward pass (Llama 2/3, SmolLM, TinyLlama...) over a paged KV cache.

The step's tokens are one flat [T] batch (no padding): decode and prefill rows side by side,
described by an AttentionMetadata. q/k/v and gate/up are fused into one matmul each, loaded
from the checkpoint's separate tensors; `load_weights` slices every tensor for a tensor-parallel
rank (column-parallel: qkv, gate_up, embedding, lm_head; row-parallel: o_proj, down_proj), so
a TP worker reads only its shard. The forward itself is single-rank for now.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from engine_core.attention import AttentionMetadata, paged_attention
from engine_core.models.layers import Linear, RMSNorm, RotaryEmbedding, apply_rope, silu_and_mul
from engine_core.models.model_config import ModelConfig

# A tensor-parallel slice of a weight: (dim, rank, size); None: the whole tensor.
Shard = tuple[int, int, int] | None


class WeightSource(Protocol):
    """Checkpoint tensors by their Hugging Face name, as float32 CPU tensors."""

    def get(self, name: str, shape: tuple[int, ...], shard: Shard) -> torch.Tensor: ...


def hf_weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama checkpoint must provide, by Hugging Face name, with its shape."""
    h, hd = cfg.hidden_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (cfg.num_heads * hd, h)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.num_kv_heads * hd, h)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.num_kv_heads * hd, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, cfg.num_heads * hd)
        shapes[p + "mlp.gate_proj.weight"] = (cfg.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (cfg.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, cfg.intermediate_size)
    return shapes


class LlamaAttention(nn.Module):
    """Fused-QKV grouped-query attention with RoPE, reading and writing the paged cache."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        qkv_size = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, qkv_size)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qk_heads = self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x)
        # q and k heads side by side: one rotation for both.
        qk = apply_rope(qkv[:, : qk_heads * self.head_dim].view(num_tokens, qk_heads, -1), cos, sin)
        v = qkv[:, qk_heads * self.head_dim :].view(num_tokens, self.num_kv_heads, -1)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        return self.o_proj(paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward with fused gate and up projections."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; the residual stream travels beside the hidden states (fused adds)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head; logits only for the rows asked."""

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Parameter(
            torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False
        )
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.rotary = RotaryEmbedding(
            cfg.head_dim,
            max_positions or cfg.max_position_embeddings,
            cfg.rope_theta,
            cfg.rope_scaling,
        )

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_caches: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of the step's tokens; kv_caches is [layers, 2, blocks, ...]."""
        h = F.embedding(input_ids, self.embed_tokens)
        cos, sin = self.rotary.cos_sin(meta.positions, h.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h, residual = layer(h, residual, cos, sin, kv_cache, meta)
        return self.norm(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, vocab] for the given rows of hidden states."""
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_weights(
        self,
        source: WeightSource,
        weight_dtype: torch.dtype = torch.float32,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        """Copy the checkpoint in, rounded to weight_dtype (params may be stored wider)."""
        if tp_size != 1:
            raise NotImplementedError(f"tensor parallelism is not implemented, tp_size={tp_size}.")
        shapes = hf_weight_shapes(self.config)
        params = dict(self.named_parameters())
        for name, (hf_names, dim) in self._weight_map().items():
            shard = None if dim is None or tp_size == 1 else (dim, tp_rank, tp_size)
            parts = []
            for hf_name in hf_names:
                t = source.get(hf_name, shapes[hf_name], shard)
                expected = _shard_shape(shapes[hf_name], shard)
                if tuple(t.shape) != expected:
                    raise ValueError(
                        f"checkpoint tensor {hf_name!r} has shape {tuple(t.shape)}, expected {expected}."
                    )
                parts.append(t.to(weight_dtype))
            params[name].copy_(torch.cat(parts) if len(parts) > 1 else parts[0])

    def _weight_map(self) -> dict[str, tuple[list[str], int | None]]:
        """Our parameter -> (checkpoint tensors concatenated along dim 0, TP shard dim)."""
        cfg = self.config
        embed = "model.embed_tokens.weight"
        out: dict[str, tuple[list[str], int | None]] = {
            "embed_tokens": ([embed], 0),
            "norm.weight": (["model.norm.weight"], None),
            "lm_head.weight": ([embed if cfg.tie_word_embeddings else "lm_head.weight"], 0),
        }
        for i in range(cfg.num_layers):
            ours, hf = f"layers.{i}.", f"model.layers.{i}."
            attn, mlp = hf + "self_attn.", hf + "mlp."
            out[ours + "input_layernorm.weight"] = ([hf + "input_layernorm.weight"], None)
            out[ours + "post_attention_layernorm.weight"] = (
                [hf + "post_attention_layernorm.weight"],
                None,
            )
            out[ours + "self_attn.qkv_proj.weight"] = (
                [attn + p for p in ("q_proj.weight", "k_proj.weight", "v_proj.weight")],
                0,
            )
            out[ours + "self_attn.o_proj.weight"] = ([attn + "o_proj.weight"], 1)
            out[ours + "mlp.gate_up_proj.weight"] = (
                [mlp + "gate_proj.weight", mlp + "up_proj.weight"],
                0,
            )
            out[ours + "mlp.down_proj.weight"] = ([mlp + "down_proj.weight"], 1)
        return out

    def pack_weights(self) -> None:
        """Put every linear layer in its fastest layout for this device (after loading)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()
        if self.config.tie_word_embeddings and self.lm_head.packed is None:
            self.lm_head.weight = self.embed_tokens  # one tensor, as in the checkpoint


def _shard_shape(shape: tuple[int, ...], shard: Shard) -> tuple[int, ...]:
    if shard is None:
        return shape
    dim, _, size = shard
    return shape[:dim] + (shape[dim] // size,) + shape[dim + 1 :]
