# SPDX-License-Identifier: Apache-2.0
"""mindie-llm: LLM serving over a C++ continuous-batching scheduler.

    from mindie_llm import LLM, SamplingParams
    llm = LLM()                                   # the embedded SmolLM2-135M-Instruct on the CPU
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))

Names are imported lazily so that ``import mindie_llm`` stays cheap (no torch until needed).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": "mindie_llm.engine.llm",
    "LLMEngine": "mindie_llm.engine.llm_engine",
    "AsyncLLM": "mindie_llm.engine.async_llm",
    "SamplingParams": "mindie_llm.sampling_params",
    "RequestOutput": "mindie_llm.outputs",
    "CompletionOutput": "mindie_llm.outputs",
    "EngineConfig": "mindie_llm.config",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mindie_llm' has no attribute {name!r}")
