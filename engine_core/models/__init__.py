"""Model definitions: our own Llama forward pass and what it is built from."""

from engine_core.models.llama import LlamaForCausalLM
from engine_core.models.model_config import ModelConfig

__all__ = ["LlamaForCausalLM", "ModelConfig"]
