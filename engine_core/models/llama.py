"""The Llama forward pass (Llama 2/3, SmolLM, TinyLlama...) over a paged KV cache.

The step's tokens are one flat [T] batch (no padding): decode and prefill rows side by side,
described by the attention backend's metadata. q/k/v and gate/up are fused into one matmul
each, loaded from the checkpoint's separate tensors.

The model knows no device path: its attention layers call the attention backend
(engine_core/attention/, `native` by default, set once by `set_attention_backend`) and its
norms, rotary embedding and activation the backend's fused ops (models/ops.py). The linear
layers are the same on both paths.

Tensor parallelism (tp_size > 1, one rank per process in a torch.distributed group): q/k/v
and gate/up are column-parallel (each rank holds its heads and its slice of the intermediate
size), o_proj and down_proj row-parallel followed by an all-reduce, the embedding and LM head
vocab-parallel (rows [r*V/N, (r+1)*V/N) of the vocabulary padded to a multiple of N; the
lookup masks foreign ids and all-reduces, the logits are gathered on rank 0). A model with
fewer KV heads than ranks replicates them: rank r uses KV head r * num_kv_heads // N, which
serves exactly its query heads. `load_weights` reads only the rank's shard of each tensor.
With tp_size == 1 none of this runs: no collective, no masking, the unsharded checkpoint.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from engine_core.attention import AttentionBackend, StepMetadata
from engine_core.distributed import all_reduce_sum, gather_to_first
from engine_core.models import fused_step
from engine_core.models.layers import Linear, RMSNorm, RotaryEmbedding
from engine_core.models.model_config import ModelConfig
from engine_core.models.ops import NATIVE_OPS, ModelOps

# A tensor-parallel slice of a checkpoint tensor: rows or columns [start, stop) along dim
# (stop may pass the end: a padded vocabulary's last shard); None: the whole tensor.
Shard = tuple[int, int, int] | None
RopeTables = tuple[torch.Tensor, torch.Tensor]


@functools.cache
def _native_backend() -> AttentionBackend:
    """Until set_attention_backend: the native backend (what tests of the bare model run)."""
    from engine_core.attention.torch_paged import NativeBackend  # it builds on models/

    return NativeBackend()


class WeightSource(Protocol):
    """Checkpoint tensors by their Hugging Face name, as float32 CPU tensors."""

    def get(self, name: str, shape: tuple[int, ...], shard: Shard) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class TensorParallelShape:
    """What one tensor-parallel rank holds of the model: its heads, MLP slice and vocab rows."""

    tp_rank: int
    tp_size: int
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank
    kv_head_start: int  # this rank's first KV head in the checkpoint
    intermediate_size: int  # this rank's slice of the MLP
    vocab_rows: int  # embedding / LM head rows per rank (the vocabulary padded to N of them)

    @property
    def vocab_start(self) -> int:
        return self.tp_rank * self.vocab_rows


def tensor_parallel_shape(cfg: ModelConfig, tp_rank: int, tp_size: int) -> TensorParallelShape:
    """Split the model for rank tp_rank of tp_size; a model that cannot split raises ValueError."""
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must be in [0, {tp_size}), got {tp_rank}.")
    heads, kv_heads = cfg.num_heads, cfg.num_kv_heads
    counts = f"the model has {heads} attention heads and {kv_heads} KV heads"
    if heads % tp_size:
        raise ValueError(
            f"tensor_parallel_size={tp_size} must divide the number of attention heads: {counts}."
        )
    if kv_heads >= tp_size and kv_heads % tp_size:
        raise ValueError(
            f"tensor_parallel_size={tp_size} must divide the number of KV heads (or be a "
            f"multiple of it): {counts}."
        )
    if kv_heads < tp_size and tp_size % kv_heads:
        raise ValueError(
            f"tensor_parallel_size={tp_size} must be a multiple of the number of KV heads when it "
            f"exceeds it (each rank then replicates one): {counts}."
        )
    if cfg.intermediate_size % tp_size:
        raise ValueError(
            f"tensor_parallel_size={tp_size} must divide the MLP's intermediate size "
            f"({cfg.intermediate_size})."
        )
    local_kv = max(1, kv_heads // tp_size)
    # Fewer KV heads than ranks: rank r's query heads all fall in KV group r * kv_heads // N.
    kv_start = tp_rank * local_kv if kv_heads >= tp_size else tp_rank * kv_heads // tp_size
    return TensorParallelShape(
        tp_rank=tp_rank,
        tp_size=tp_size,
        num_heads=heads // tp_size,
        num_kv_heads=local_kv,
        kv_head_start=kv_start,
        intermediate_size=cfg.intermediate_size // tp_size,
        vocab_rows=-(-cfg.vocab_size // tp_size),
    )


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

    def __init__(self, cfg: ModelConfig, tp: TensorParallelShape) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            tp.num_heads,
            tp.num_kv_heads,
            cfg.head_dim,
        )
        self.tp_size = tp.tp_size
        qkv_size = (self.num_heads + 2 * self.num_kv_heads) * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, qkv_size)
        self.o_proj = Linear(self.num_heads * cfg.head_dim, cfg.hidden_size)
        self.attn: AttentionBackend = _native_backend()

    def forward(
        self, x: torch.Tensor, rope: RopeTables, kv_cache: torch.Tensor, meta: StepMetadata
    ) -> torch.Tensor:
        num_tokens, hd = x.shape[0], self.head_dim
        qk_heads = self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x)
        # q and k heads side by side: one rotation for both.
        qk = qkv[:, : qk_heads * hd].view(num_tokens, qk_heads, hd)
        qk = self.attn.ops.rotate(qk, self.num_heads, meta.positions, rope)
        v = qkv[:, qk_heads * hd :].view(num_tokens, self.num_kv_heads, hd)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        out = self.o_proj(self.attn(q, k, v, kv_cache, meta))
        return all_reduce_sum(out) if self.tp_size > 1 else out


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward with fused gate and up projections."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallelShape) -> None:
        super().__init__()
        self.tp_size = tp.tp_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * tp.intermediate_size)
        self.down_proj = Linear(tp.intermediate_size, cfg.hidden_size)
        self.ops: ModelOps = NATIVE_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))
        return all_reduce_sum(out) if self.tp_size > 1 else out


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; the residual stream travels beside the hidden states (fused adds)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallelShape) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg, tp)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeTables,
        kv_cache: torch.Tensor,
        meta: StepMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head; logits only for the rows asked."""

    def __init__(
        self,
        cfg: ModelConfig,
        max_positions: int | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.tp = tensor_parallel_shape(cfg, tp_rank, tp_size)
        self.embed_tokens = nn.Parameter(
            torch.empty(self.tp.vocab_rows, cfg.hidden_size), requires_grad=False
        )
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, self.tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, self.tp.vocab_rows)
        self.rotary = RotaryEmbedding(
            cfg.head_dim,
            max_positions or cfg.max_position_embeddings,
            cfg.rope_theta,
            cfg.rope_scaling,
        )
        self.attn_backend: AttentionBackend = _native_backend()
        self._fused: Any = None  # models/fused_step.py's plan, False where it cannot run

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        """Run every layer's attention and fused ops on `backend` (once, before the first step)."""
        self.attn_backend, self._fused = backend, None
        for module in self.modules():
            if isinstance(module, LlamaAttention):
                module.attn = backend
            elif isinstance(module, (RMSNorm, LlamaMLP)):
                module.ops = backend.ops

    def forward(
        self, input_ids: torch.Tensor, meta: StepMetadata, kv_caches: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of the step's tokens; kv_caches is [layers, 2, blocks, ...];
        meta is the attention backend's metadata for the step."""
        if isinstance(self.embed_tokens, nn.Module):  # a QuantizedEmbedding (models/gguf_quant.py)
            h = self.embed_tokens(input_ids)
        elif self.tp.tp_size == 1:
            h = F.embedding(input_ids, self.embed_tokens)
        else:
            h = self._vocab_parallel_embedding(input_ids)
        rope = self.attn_backend.ops.rope_tables(self.rotary, meta.positions, h.dtype)
        if self._fused is None:
            self._fused = fused_step.build(self) or False
        if self._fused and fused_step.applies(meta, h, self._fused):
            return fused_step.run(self._fused, h, kv_caches, meta, rope)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h, residual = layer(h, residual, rope, kv_cache, meta)
        return self.norm(h, residual)[0]

    def _vocab_parallel_embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Each rank embeds the ids in its rows and zeros the rest; the sum is the full lookup.
        local = input_ids - self.tp.vocab_start
        foreign = (local < 0) | (local >= self.tp.vocab_rows)
        h = F.embedding(local.masked_fill(foreign, 0), self.embed_tokens)
        return all_reduce_sum(h.masked_fill_(foreign.unsqueeze(1), 0.0))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """float32 logits [B, vocab] for the given rows of hidden states.

        With tensor parallelism every rank must call it (the shards are gathered); rank 0
        gets the logits, the other ranks None.
        """
        logits = self.lm_head(hidden).float()
        if self.tp.tp_size == 1:
            return logits
        parts = gather_to_first(logits)
        if parts is None:
            return None
        return torch.cat(parts, dim=1)[:, : self.config.vocab_size]

    @torch.no_grad()
    def load_weights(
        self,
        source: WeightSource,
        weight_dtype: torch.dtype = torch.float32,
        tp_rank: int | None = None,
        tp_size: int | None = None,
    ) -> None:
        """Copy this rank's shard of the checkpoint in, rounded to weight_dtype.

        tp_rank and tp_size default to (and must match) the ones the model was built for.
        """
        rank = self.tp.tp_rank if tp_rank is None else tp_rank
        size = self.tp.tp_size if tp_size is None else tp_size
        if (rank, size) != (self.tp.tp_rank, self.tp.tp_size):
            raise ValueError(
                f"the model was built for tp_rank={self.tp.tp_rank} of {self.tp.tp_size}, "
                f"not tp_rank={rank} of {size}."
            )
        shapes = hf_weight_shapes(self.config)
        params = dict(self.named_parameters())
        for name, tensors in self._weight_map().items():
            parts = []
            for hf_name, shard in tensors:
                t = source.get(hf_name, shapes[hf_name], shard)
                expected = _shard_shape(shapes[hf_name], shard)
                if tuple(t.shape) != expected:
                    raise ValueError(
                        f"checkpoint tensor {hf_name!r} has shape {tuple(t.shape)}, expected {expected}."
                    )
                parts.append(t.to(weight_dtype))
            param = params[name]
            loaded = torch.cat(parts) if len(parts) > 1 else parts[0]
            if loaded.shape[0] < param.shape[0]:  # the padded tail of the vocabulary
                param[loaded.shape[0] :].zero_()
                param = param[: loaded.shape[0]]
            param.copy_(loaded)

    def _weight_map(self) -> dict[str, list[tuple[str, Shard]]]:
        """Our parameter -> checkpoint tensors (concatenated along dim 0), each with its shard."""
        cfg, tp = self.config, self.tp
        hd = cfg.head_dim

        def rows(start: int, count: int, dim: int = 0) -> Shard:
            return None if tp.tp_size == 1 else (dim, start, start + count)

        vocab = rows(tp.vocab_start, tp.vocab_rows)
        q = rows(tp.tp_rank * tp.num_heads * hd, tp.num_heads * hd)
        kv = rows(tp.kv_head_start * hd, tp.num_kv_heads * hd)
        o = rows(tp.tp_rank * tp.num_heads * hd, tp.num_heads * hd, dim=1)
        mlp = rows(tp.tp_rank * tp.intermediate_size, tp.intermediate_size)
        down = rows(tp.tp_rank * tp.intermediate_size, tp.intermediate_size, dim=1)
        embed = "model.embed_tokens.weight"
        out: dict[str, list[tuple[str, Shard]]] = {
            "embed_tokens": [(embed, vocab)],
            "norm.weight": [("model.norm.weight", None)],
            "lm_head.weight": [(embed if cfg.tie_word_embeddings else "lm_head.weight", vocab)],
        }
        for i in range(cfg.num_layers):
            ours, hf = f"layers.{i}.", f"model.layers.{i}."
            attn, mlp_ = hf + "self_attn.", hf + "mlp."
            out[ours + "input_layernorm.weight"] = [(hf + "input_layernorm.weight", None)]
            out[ours + "post_attention_layernorm.weight"] = [
                (hf + "post_attention_layernorm.weight", None)
            ]
            out[ours + "self_attn.qkv_proj.weight"] = [
                (attn + "q_proj.weight", q),
                (attn + "k_proj.weight", kv),
                (attn + "v_proj.weight", kv),
            ]
            out[ours + "self_attn.o_proj.weight"] = [(attn + "o_proj.weight", o)]
            out[ours + "mlp.gate_up_proj.weight"] = [
                (mlp_ + "gate_proj.weight", mlp),
                (mlp_ + "up_proj.weight", mlp),
            ]
            out[ours + "mlp.down_proj.weight"] = [(mlp_ + "down_proj.weight", down)]
        return out

    def pack_weights(self) -> None:
        """Put every linear layer in its fastest layout for this device (after loading)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()
        if self.config.tie_word_embeddings and self.lm_head.packed is None:
            self.lm_head.weight = self.embed_tokens  # one tensor, as in the checkpoint

    def weight_bytes(self) -> int:
        """Bytes of weights this process holds (packed copies included, shared tensors once)."""
        seen: set[int] = set()
        total = 0
        for t in self.parameters():
            if t.numel() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        for module in self.modules():
            if isinstance(module, Linear) and module.packed is not None:
                total += module.packed.numel() * module.packed.element_size()
        return total


def _shard_shape(shape: tuple[int, ...], shard: Shard) -> tuple[int, ...]:
    """The shape a shard of a tensor of `shape` has (a padded vocabulary's tail is cut)."""
    if shard is None:
        return shape
    dim, start, stop = shard
    return shape[:dim] + (max(0, min(stop, shape[dim]) - start),) + shape[dim + 1 :]
