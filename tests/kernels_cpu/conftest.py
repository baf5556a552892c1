"""The engine tests' model fixtures, for the quantized-model tests that live here."""

from tests.engine_core.conftest import make_tiny_llama, smollm2_tokenizer

__all__ = ["make_tiny_llama", "smollm2_tokenizer"]
