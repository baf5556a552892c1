"""LLM: the offline API (vLLM's names), generating with an EngineCore process behind it."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any, cast

from engine_core.config import EngineConfig
from engine_core.protocol import SamplingParams, SchedulerStats
from frontend.core_client import EngineCoreClient
from frontend.output_processor import OutputProcessor
from frontend.outputs import RequestOutput, RequestOutputKind
from frontend.prompts import PromptType, prepare_prompt
from frontend.tokenizer import load_tokenizer


class LLM:
    """Generate text offline: `LLM().generate(prompts, SamplingParams(...))`.

    Starts one EngineCore process (the model, KV cache and scheduler live there); the
    tokenizer, detokenization and stop strings stay in this process.
    """

    def __init__(
        self,
        model: str | None = None,
        tokenizer: str | None = None,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        num_gpu_blocks_override: int | None = None,
        max_model_len: int | None = None,
        seed: int = 0,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = False,
        **kwargs: Any,
    ) -> None:
        self.config = EngineConfig(
            model=model,
            tokenizer=tokenizer,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            enable_prefix_caching=enable_prefix_caching,
            num_gpu_blocks_override=num_gpu_blocks_override,
            max_model_len=max_model_len,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            **kwargs,
        )
        self.tokenizer = load_tokenizer(model, tokenizer)
        self.engine = EngineCoreClient(self.config)
        self.max_model_len = self.engine.ready.max_model_len
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    # ---------------------------------------------------------------- public API

    def get_tokenizer(self):
        return self.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns one RequestOutput per prompt, in input order."""
        prompt_list = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompt_list))
        # Validate every prompt before any is sent, so a bad one leaves nothing in the core.
        pending = []
        for prompt, sp in zip(prompt_list, params, strict=True):
            text, token_ids = prepare_prompt(
                self.tokenizer, prompt, sp, self.max_model_len, self.engine.ready.vocab_size
            )
            pending.append((str(next(self._ids)), text, token_ids, sp))
        return self._run(pending, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = []
        for conversation in conversations:
            if not conversation:
                raise ValueError("messages must not be empty")
            ids = self.tokenizer.apply_chat_template(
                conversation,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                **(chat_template_kwargs or {}),
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def reset_prefix_cache(self) -> bool:
        return bool(self._utility("reset_prefix_cache"))

    def get_stats(self) -> SchedulerStats:
        """The scheduler's gauges now: running/waiting requests, free and total KV blocks."""
        import msgspec

        raw = self._utility("stats")
        return msgspec.convert(raw, SchedulerStats)

    def close(self) -> None:
        """Stop the EngineCore process and free its shared memory; idempotent."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # ---------------------------------------------------------------- internals

    def _run(self, requests: list[tuple], use_tqdm: bool) -> list[RequestOutput]:
        order = {rid: i for i, (rid, *_rest) in enumerate(requests)}
        results: list[RequestOutput | None] = [None] * len(requests)
        now = time.monotonic()
        for rid, text, token_ids, sp in requests:
            for core_req in self.processor.add_request(
                rid, text, token_ids, sp, now, RequestOutputKind.FINAL_ONLY
            ):
                self.engine.add_request(core_req)
        bar = _progress(len(requests), use_tqdm)
        try:
            done = 0
            while done < len(requests):
                outs = self.engine.get_outputs()
                processed = self.processor.process_outputs(outs.outputs, time.monotonic())
                if processed.reqs_to_abort:
                    self.engine.abort_requests(processed.reqs_to_abort)
                for ro in processed.request_outputs:
                    if ro.finished and ro.request_id in order:
                        results[order[ro.request_id]] = ro
                        done += 1
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            # Ctrl-C or a dead engine: leave neither requests in the core nor state here.
            ids = [rid for rid, *_ in requests]
            engine_ids = self.processor.abort_requests(ids)
            if self.engine.is_alive():
                try:
                    self.engine.abort_requests(engine_ids)
                except Exception:
                    pass
            raise
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]

    def _utility(self, method: str) -> Any:
        import msgspec

        call_id = next(self._ids)
        self.engine.call_utility_nowait(call_id, method)
        while True:
            outs = self.engine.get_outputs(timeout=60.0)
            if outs.outputs:
                self.processor.process_outputs(outs.outputs, time.monotonic())
            u = outs.utility_output
            if u is not None and u.call_id == call_id:
                if u.error:
                    raise RuntimeError(u.error)
                return msgspec.msgpack.decode(u.result) if u.result else None


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    return list(cast(Sequence[PromptType], prompts))


def _as_params_list(
    sampling_params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * n
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    params = list(sampling_params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return params


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
