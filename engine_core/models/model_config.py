"""ModelConfig: a Llama model's hyperparameters, read from GGUF metadata or a config.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# RoPE variants we implement; others (yarn, dynamic, longrope) are refused by name at load.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything the Llama forward pass needs to know about the checkpoint's shapes."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None: plain RoPE; else has "rope_type"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # The checkpoint's own dtype ("bfloat16", ...) when it says; dtype="auto" follows it.
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads must divide num_heads={self.num_heads}, got {self.num_kv_heads}."
            )
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even number, got {self.head_dim}.")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"rope scaling type {rope_type!r} is not supported "
                    f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})."
                )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config.json dict (old rope_scaling or new rope_parameters)."""
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        model_type = cfg.get("model_type", "llama")
        if model_type != "llama" and "LlamaForCausalLM" not in archs:
            raise ValueError(f"only Llama models are supported, got model_type={model_type!r}.")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if key not in cfg:
                raise ValueError(f"config.json has no {key!r}.")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError("Llama checkpoints with attention_bias or mlp_bias are not supported.")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {cfg['hidden_act']!r}.")
        num_heads = cfg.get("num_attention_heads", 0)
        if num_heads < 1:
            raise ValueError(f"num_attention_heads must be at least 1, got {num_heads}.")
        rope_theta, rope_scaling = _hf_rope(cfg)
        eos = cfg.get("eos_token_id")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[] if eos is None else list(eos) if isinstance(eos, list) else [eos],
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )

    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
        """Build from GGUF metadata (`llama.*` keys) and the file's tensor names."""
        arch = fields.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"only llama GGUF files are supported, got architecture {arch!r}.")

        def need(key: str) -> Any:
            if f"llama.{key}" not in fields:
                raise ValueError(f"the GGUF file has no 'llama.{key}' metadata.")
            return fields[f"llama.{key}"]

        hidden = int(need("embedding_length"))
        num_heads = int(need("attention.head_count"))
        head_dim = int(fields.get("llama.rope.dimension_count") or hidden // num_heads)
        vocab = fields.get("llama.vocab_size") or len(fields.get("tokenizer.ggml.tokens") or ())
        scaling = None
        scaling_type = fields.get("llama.rope.scaling.type")
        if scaling_type not in (None, "none"):
            if scaling_type != "linear":
                raise ValueError(f"GGUF rope scaling type {scaling_type!r} is not supported.")
            scaling = {"rope_type": "linear", "factor": float(fields["llama.rope.scaling.factor"])}
        if "rope_freqs.weight" in tensor_names:
            # llama.cpp stores Llama 3.1's scaling as per-frequency divisors, not as metadata.
            raise ValueError(
                "GGUF files with a rope_freqs tensor (Llama 3.1 scaling) are unsupported."
            )
        eos = fields.get("tokenizer.ggml.eos_token_id")
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(fields.get("llama.attention.head_count_kv") or num_heads),
            head_dim=head_dim,
            rope_theta=float(fields.get("llama.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            max_position_embeddings=int(fields.get("llama.context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[] if eos is None else [int(eos)],
        )


def _hf_rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from transformers' old (rope_scaling) or new (rope_parameters)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
        return theta, None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope scaling type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})."
        )
    required = {"linear": ("factor",), "llama3": _LLAMA3_KEYS}[rope_type]
    missing = [k for k in required if k not in params]
    if missing:
        raise ValueError(f"{rope_type} rope scaling needs {missing} in config.json.")
    return theta, {"rope_type": rope_type, **params}


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
