"""vLLM's import path for sampling settings: `from frontend.sampling_params import ...`."""

from engine_core.protocol import SamplingParams, StructuredOutputsParams

__all__ = ["SamplingParams", "StructuredOutputsParams"]
