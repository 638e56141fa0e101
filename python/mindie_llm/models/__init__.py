# SPDX-License-Identifier: Apache-2.0
"""Model definitions (device-agnostic). Must not import the engine, executor, loader or backends."""
from mindie_llm.models.config import ArchConfigError, LlamaArchConfig
from mindie_llm.models.llama import LlamaForCausalLM
from mindie_llm.models.registry import build_model, get_model_class

__all__ = ["ArchConfigError", "LlamaArchConfig", "LlamaForCausalLM", "build_model", "get_model_class"]
