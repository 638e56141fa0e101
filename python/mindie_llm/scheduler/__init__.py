# SPDX-License-Identifier: Apache-2.0
"""The scheduler: a thin facade over the C++ extension ``mindie_llm._scheduler``.

Exports the API of contracts 1-3 in docs/architecture.md. Must not import torch, the engine, the
executor or the server.
"""
from mindie_llm.scheduler.outputs import FinishReason, SchedulerOutput, UpdateResult
from mindie_llm.scheduler.scheduler import (
    NoFreeBlocksError,
    RequestRejectedError,
    Scheduler,
    SchedulerConfigError,
    SchedulerContractError,
    SchedulerCoreConfig,
    SchedulerError,
    UnknownRequestError,
)

__all__ = [
    "FinishReason", "NoFreeBlocksError", "RequestRejectedError", "Scheduler", "SchedulerConfigError",
    "SchedulerContractError", "SchedulerCoreConfig", "SchedulerError", "SchedulerOutput", "UnknownRequestError",
    "UpdateResult",
]
