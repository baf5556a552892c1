"""The executor: the seam between the EngineCore's scheduling and the model on its devices.

`make_executor(config)` gives the EngineCore one of two: a UniprocExecutor around one
ModelRunner in the EngineCore process (tensor_parallel_size 1), or a MultiprocExecutor that
drives one worker process per tensor-parallel rank. This package imports no torch: the
EngineCore only schedules, and the uniproc executor loads the runner when it is built.
"""

from __future__ import annotations

from typing import Protocol

from engine_core.config import EngineConfig
from engine_core.protocol import (
    GrammarOutput,
    ModelRunnerOutput,
    SchedulerOutput,
    WorkerModelConfig,
)


class Executor(Protocol):
    """What the EngineCore needs of the model, wherever it runs."""

    max_model_len: int
    num_blocks: int  # KV cache blocks every rank holds
    model_config: WorkerModelConfig
    weight_bytes: list[int]  # bytes of weights each rank holds

    def warmup(self) -> None:
        """Run the warm-up forwards (and capture CUDA graphs) before the first request."""

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        """Run one scheduled step; the sampled tokens of the requests that caught up.

        None when the step has structured rows (scheduler_output.structured_req_ids): the
        forward is started, not waited for, and sample_tokens finishes the step once the
        caller has filled its grammar bitmask.
        """
        ...

    def sample_tokens(self, grammar_output: GrammarOutput | None) -> ModelRunnerOutput:
        """Finish the step execute_model started: its logits masked, then sampled."""
        ...

    def check_health(self) -> None:
        """Raise if the executor can no longer run steps (a worker died)."""

    def shutdown(self) -> None:
        """Release processes, queues and devices; safe to call twice."""


def make_executor(config: EngineConfig) -> Executor:
    """The executor for config: multiproc for tensor parallelism, else uniproc."""
    if config.tensor_parallel_size > 1:
        from engine_core.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config)
    from engine_core.executor.uniproc import UniprocExecutor

    return UniprocExecutor(config)
