"""Shared fixtures: transformers' own SmolLM2 as the reference, and tiny random Llama dirs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

# A small Llama that still has every feature: GQA (4 heads, 2 KV heads), several layers.
TINY_LLAMA = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


def _load_hf_reference_model():
    """transformers' LlamaForCausalLM with the default GGUF's weights, dequantized, in fp32."""
    from tools.hf_reference import load_hf_model

    return load_hf_model(None, "float32")


@pytest.fixture(scope="session")
def hf_smollm2():
    """The default model as transformers runs it (fp32, its own GGUF dequantization)."""
    return _load_hf_reference_model()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from frontend.tokenizer import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def make_tiny_llama(tmp_path_factory) -> Callable[..., str]:
    """Factory: a random Llama saved as a Hugging Face dir (config.json + safetensors).

    `make_tiny_llama(name, **overrides)` takes LlamaConfig fields over TINY_LLAMA; the same
    name returns the same directory.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    made: dict[str, str] = {}

    def make(name: str, **overrides) -> str:
        if name not in made:
            # One seed for every model: its weights do not depend on which test made it first
            # (tests comparing greedy tokens of two paths are sensitive to near-ties).
            torch.manual_seed(1)
            config = LlamaConfig(**{**TINY_LLAMA, **overrides})
            model = LlamaForCausalLM(config).eval()
            # Random init leaves norms at 1: perturb them so a wrong norm wiring shows.
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.endswith("norm.weight"):
                        p.add_(0.1 * torch.randn_like(p))
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path, safe_serialization=True)
            made[name] = str(path)
        return made[name]

    return make
