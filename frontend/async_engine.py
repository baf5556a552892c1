"""AsyncLLM for embedding: vLLM's async engine API over ringserve, in the caller's event loop.

    async with AsyncLLM(model=None, max_num_seqs=64) as engine:
        async for out in engine.generate("Hello", SamplingParams(max_tokens=8), "req-1"):
            print(out.outputs[0].text)

The EngineCore process starts on first use (or `await engine.start()`); `generate` yields
RequestOutputs as they grow (cumulative by default, as vLLM's do), structured outputs
included; `await engine.abort(id)` stops one request; `await engine.shutdown()` stops the
process. The server's own engine is frontend.async_llm.AsyncLLM, which this wraps.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from engine_core.config import EngineConfig
from engine_core.protocol import SamplingParams
from frontend.async_llm import AsyncLLM as _ServerEngine
from frontend.outputs import RequestOutput, RequestOutputKind
from frontend.prompts import PromptType, prepare_prompt


class AsyncLLM:
    """An embeddable async engine: `AsyncLLM(model=..., **engine_args)` (EngineConfig's names)."""

    def __init__(
        self, model: str | None = None, *, startup_timeout: float = 300.0, **engine_args: Any
    ) -> None:
        engine_args.setdefault("usage_context", "server")  # an online engine, as the server
        self.config = EngineConfig(model=model, **engine_args)
        self.startup_timeout = startup_timeout
        self._engine: _ServerEngine | None = None
        self._starting: asyncio.Lock | None = None
        self._closed = False

    @classmethod
    def from_engine_args(cls, engine_args: EngineConfig | dict[str, Any]) -> AsyncLLM:
        """From an EngineConfig (our AsyncEngineArgs) or a dict of its fields."""
        if isinstance(engine_args, EngineConfig):
            fields = {k: getattr(engine_args, k) for k in EngineConfig.__slots__}
        else:
            fields = dict(engine_args)
        return cls(**fields)

    # ---------------------------------------------------------------- life cycle

    async def start(self) -> AsyncLLM:
        """Start the EngineCore process (idempotent; generate() calls it)."""
        if self._closed:
            raise RuntimeError("this AsyncLLM was shut down.")
        if self._engine is None:
            if self._starting is None:
                self._starting = asyncio.Lock()
            async with self._starting:
                if self._engine is None:
                    self._engine = await _ServerEngine.start(self.config, self.startup_timeout)
        return self

    async def shutdown(self) -> None:
        """Stop the EngineCore process; requests in flight end with an error. Idempotent."""
        self._closed = True
        if self._engine is not None:
            self._engine.shutdown()

    async def __aenter__(self) -> AsyncLLM:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    @property
    def tokenizer(self) -> Any:
        return self._require().tokenizer

    async def get_tokenizer(self) -> Any:
        return (await self.start())._require().tokenizer

    # ---------------------------------------------------------------- requests

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None,
        request_id: str,
        output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes; leaving the loop early aborts it.

        A bad prompt or spec raises ValueError naming it, before anything reaches the core.
        """
        await self.start()
        engine = self._require()
        params = sampling_params if sampling_params is not None else SamplingParams()
        text, token_ids = prepare_prompt(
            engine.tokenizer, prompt, params, engine.max_model_len, engine.vocab_size
        )
        gen = engine.generate(text, token_ids, params, request_id, output_kind)
        async with contextlib.aclosing(gen):
            async for out in gen:
                yield out

    async def abort(self, request_id: str | list[str]) -> None:
        """Stop requests; their generate() loops end with finish_reason "abort"."""
        if self._engine is None:
            return
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            self._engine.abort(rid)

    async def check_health(self) -> bool:
        return self._engine is not None and await self._engine.check_health()

    # ---------------------------------------------------------------- internals

    def _require(self) -> _ServerEngine:
        if self._engine is None:
            raise RuntimeError("the engine is not started: await engine.start() first.")
        return self._engine
