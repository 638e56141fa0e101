# SPDX-License-Identifier: Apache-2.0
"""Executor: the one object the engine drives each step, whatever the number of ranks.

``execute(SchedulerOutput) -> ModelRunnerOutput`` sends the step message to every worker and
returns the driver rank's result. ``UniprocExecutor`` owns one in-process ``Worker``;
``make_executor(config)`` picks the executor a deployment needs.

Must not import the engine, the scheduler extension or the server.
"""
from __future__ import annotations

import abc
from typing import Any

from mindie_llm.config import EngineConfig
from mindie_llm.contract import ModelRunnerOutput, SchedulerOutput
from mindie_llm.executor.worker import Worker, WorkerInfo

__all__ = ["Executor", "UniprocExecutor", "make_executor"]


class Executor(abc.ABC):
    """The engine's view of the workers."""

    info: WorkerInfo

    @abc.abstractmethod
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Runs one step on every worker; the driver's result."""

    def check_health(self) -> None:
        """Raises if a worker is dead or hung (in-process workers are always alive)."""

    def shutdown(self) -> None:
        """Stops the workers (idempotent)."""


class UniprocExecutor(Executor):
    """One worker, in this process (tensor parallel size 1)."""

    def __init__(self, config: EngineConfig, *, loaded_model: Any = None) -> None:
        self.driver = Worker(config, rank=0, loaded_model=loaded_model)
        self.info = self.driver.info
        self.config = self.driver.config

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        return self.driver.execute(out)


def make_executor(config: EngineConfig, *, loaded_model: Any = None) -> Executor:
    """The executor for ``config`` (one in-process worker until tensor parallelism lands)."""
    if config.parallel.tensor_parallel_size > 1:
        from mindie_llm.executor.multiproc_executor import MultiprocExecutor

        return MultiprocExecutor(config, loaded_model=loaded_model)
    return UniprocExecutor(config, loaded_model=loaded_model)
