"""UniprocExecutor: one ModelRunner in the EngineCore process (tensor_parallel_size 1)."""

from __future__ import annotations

from engine_core.config import EngineConfig
from engine_core.protocol import ModelRunnerOutput, SchedulerOutput, WorkerModelConfig
from engine_core.worker.model_runner import ModelRunner


class UniprocExecutor:
    """Runs every step on the runner it owns; nothing crosses a process boundary."""

    def __init__(self, config: EngineConfig) -> None:
        assert config.tensor_parallel_size == 1, "tensor parallelism runs in MultiprocExecutor"
        self.runner = ModelRunner(config)
        self.max_model_len = self.runner.max_model_len
        self.num_blocks = self.runner.num_blocks
        self.model_config: WorkerModelConfig = self.runner.worker_model_config()
        self.weight_bytes = [self.runner.model.weight_bytes()]  # per rank, as multiproc

    def warmup(self) -> None:
        self.runner.warmup()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        out = self.runner.execute_model(scheduler_output)
        assert out is not None, "a single-rank runner samples every step"
        return out

    def check_health(self) -> None:
        """The runner lives in this process: while we run, it does."""

    def shutdown(self) -> None:
        """Nothing to stop: the runner's memory goes with the process."""
