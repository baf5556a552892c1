"""The frontend process: the offline LLM API and the OpenAI-compatible server."""

from typing import TYPE_CHECKING

from engine_core.protocol import SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from frontend.async_engine import AsyncLLM
    from frontend.llm import LLM
    from frontend.outputs import CompletionOutput, RequestOutput

__all__ = [
    "LLM",
    "AsyncLLM",
    "SamplingParams",
    "StructuredOutputsParams",
    "RequestOutput",
    "CompletionOutput",
]


def __getattr__(name: str):
    # Lazy, so that `python -m frontend` and tools import only what they use.
    if name == "LLM":
        from frontend.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from frontend.async_engine import AsyncLLM

        return AsyncLLM
    if name in ("RequestOutput", "CompletionOutput"):
        from frontend import outputs

        return getattr(outputs, name)
    raise AttributeError(name)
