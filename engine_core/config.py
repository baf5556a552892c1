"""EngineConfig: the one frozen configuration of the EngineCore process, with vLLM's names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16", "auto")
_QUANTIZATIONS = (None, "none", "int8", "int4", "awq", "gptq", "gguf")

# The step's token budget when max_num_batched_tokens is None (chunked prefill splits longer
# prompts): 2048, vLLM's server default. A server on a CPU takes 1024 instead: there a step of
# 2048 prompt tokens takes ~1.5 s (2 cores, the default model), each a stall for every stream
# decoding beside it and a wait for every prompt that arrives during it. tools/bench_serving.py
# (random 256 in / 128 out, 64 prompts, concurrency 32, bf16), each budget's server fresh, two
# rounds: median TTFT 3.1-3.4 s at 2048, 1.6-2.2 s at 1024, output tok/s within 2% of each
# other; a lone prompt's prefill costs 2-4% more in 1024-token chunks (9-16% in 512s).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
CPU_SERVER_MAX_NUM_BATCHED_TOKENS = 1024
_USAGE_CONTEXTS = ("llm", "server")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything the EngineCore (and its TP workers) need; sent to them as msgspec JSON."""

    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct GGUF
    tokenizer: str | None = None
    dtype: str = "auto"  # the checkpoint's; fp32 compute on a CPU (models/loader.py)
    # None: a quantized checkpoint (GGUF Q4_0/Q4_1/Q8_0) runs quantized; "none": dequantized;
    # "int8" / "int4": a plain checkpoint quantized at load (RTN into Q8_0 / Q4_1 blocks);
    # "awq" / "gptq" / "gguf" (vLLM's names): the checkpoint's own, which must be that one
    quantization: str | None = None
    tensor_parallel_size: int = 1
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: resolved_max_num_batched_tokens()
    max_model_len: int | None = None  # None: the model's context, capped at 8192
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    long_prefill_token_threshold: int = 0  # 0: a long prompt may take the whole budget
    # CPU: bytes for the KV cache (vLLM reads VLLM_CPU_KVCACHE_SPACE; we take a flag).
    kv_cache_space_gib: float = 2.0
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    device: str = "auto"  # auto | cpu | cuda
    load_format: str = "auto"  # auto | dummy
    hf_config: str | None = None  # with load_format=dummy: a config.json path
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads in the core; None: all cores
    extra: dict[str, str] = field(default_factory=dict)
    # Structured outputs: a grammar that takes longer to compile fails its request alone.
    structured_outputs_compile_timeout: float = 10.0
    # vLLM's speculative_config dict ({"method": "ngram" | "suffix", "num_speculative_tokens": k,
    # ...}); None: no speculative decoding. Validated by spec_decode.config.SpeculativeConfig.
    speculative_config: dict[str, Any] | None = None
    # vLLM's usage context: "llm" (the offline LLM) or "server" (python -m frontend, AsyncLLM),
    # whose defaults differ where serving wants another trade (the step's token budget).
    usage_context: str = "llm"

    def __post_init__(self) -> None:
        if self.quantization not in _QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {_QUANTIZATIONS[1:]}, got {self.quantization!r}."
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}.")
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}."
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}.")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}."
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}.")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}.")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 2:
            raise ValueError(
                f"num_gpu_blocks_override must be at least 2, got {self.num_gpu_blocks_override}."
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}."
            )
        if self.kv_cache_space_gib <= 0:
            raise ValueError(f"kv_cache_space_gib must be positive, got {self.kv_cache_space_gib}.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}.")
        if self.usage_context not in _USAGE_CONTEXTS:
            raise ValueError(
                f"usage_context must be one of {_USAGE_CONTEXTS}, got {self.usage_context!r}."
            )
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}.")
        if not 0.0 < self.structured_outputs_compile_timeout < float("inf"):
            raise ValueError(
                "structured_outputs_compile_timeout must be positive and finite, "
                f"got {self.structured_outputs_compile_timeout}."
            )
        if self.load_format == "dummy" and self.hf_config is None and self.model is None:
            raise ValueError(
                "load_format='dummy' needs hf_config (a config.json) or model (a directory)."
            )
        if self.speculative_config is not None:
            from engine_core.spec_decode.config import SpeculativeConfig

            SpeculativeConfig.from_dict(self.speculative_config)

    def resolved_max_num_batched_tokens(self, on_cpu: bool | None = None) -> int:
        """The step's token budget: max_num_batched_tokens, or its default for the usage
        context and the device (on_cpu: whether the engine runs on the CPU; None: from
        config.device, asking torch where it is "auto")."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        if self.usage_context != "server":
            return DEFAULT_MAX_NUM_BATCHED_TOKENS
        if on_cpu is None:
            on_cpu = self.device == "cpu"
            if self.device == "auto":
                import torch

                on_cpu = not torch.cuda.is_available()
        return CPU_SERVER_MAX_NUM_BATCHED_TOKENS if on_cpu else DEFAULT_MAX_NUM_BATCHED_TOKENS
