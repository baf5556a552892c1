"""UniprocExecutor: one ModelRunner in the EngineCore process (tensor_parallel_size 1)."""

from __future__ import annotations

import concurrent.futures

from engine_core.config import EngineConfig
from engine_core.protocol import (
    GrammarOutput,
    ModelRunnerOutput,
    SchedulerOutput,
    WorkerModelConfig,
)
from engine_core.worker.model_runner import ModelRunner


class UniprocExecutor:
    """Runs every step on the runner it owns; nothing crosses a process boundary.

    A step with structured rows runs its forward on the runner's thread (torch releases the
    GIL in its ops), so that the EngineCore fills the grammar bitmask meanwhile (so does
    xgrammar); a step without runs on the caller's thread, with no hand-off.
    """

    def __init__(self, config: EngineConfig) -> None:
        assert config.tensor_parallel_size == 1, "tensor parallelism runs in MultiprocExecutor"
        self.runner = ModelRunner(config)
        self.max_model_len = self.runner.max_model_len
        self.num_blocks = self.runner.num_blocks
        self.model_config: WorkerModelConfig = self.runner.worker_model_config()
        self.weight_bytes = [self.runner.model.weight_bytes()]  # per rank, as multiproc
        self._thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="forward", initializer=self.runner.prepare_thread
        )
        self._forward: concurrent.futures.Future | None = None

    def warmup(self) -> None:
        self.runner.warmup()
        # The runner's thread starts now: no step pays for its start.
        self._thread.submit(lambda: None).result()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        assert self._forward is None, "sample_tokens finishes a step before the next one"
        if scheduler_output.structured_req_ids:
            self._forward = self._thread.submit(self.runner.execute_model, scheduler_output)
            return None
        out = self.runner.execute_model(scheduler_output)
        assert out is not None, "a single-rank runner samples every step"
        return out

    def sample_tokens(self, grammar_output: GrammarOutput | None) -> ModelRunnerOutput:
        forward, self._forward = self._forward, None
        assert forward is not None, "execute_model ran a step that waits for its bitmask"
        forward.result()  # raises what the forward raised
        out = self.runner.sample_tokens(grammar_output)
        assert out is not None, "a single-rank runner samples every step"
        return out

    def check_health(self) -> None:
        """The runner lives in this process: while we run, it does."""

    def shutdown(self) -> None:
        """Stop the runner's thread; the runner's memory goes with the process."""
        self._thread.shutdown(wait=True)
