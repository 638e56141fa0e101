# SPDX-License-Identifier: Apache-2.0
"""OpenAI-compatible HTTP front end (FastAPI): ``build_app(async_llm, config)``.

Must not import torch or the ``LLMEngine``.
"""
from __future__ import annotations

__all__ = ["build_app"]


def __getattr__(name: str):  # lazy: importing the package must not pull FastAPI in
    if name == "build_app":
        from mindie_llm.server.http.app import build_app

        return build_app
    raise AttributeError(name)
