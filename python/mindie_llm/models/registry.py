# SPDX-License-Identifier: Apache-2.0
"""Maps HF ``architectures`` names to model classes. Imports only models."""
from __future__ import annotations

from torch import nn

from mindie_llm.distributed.parallel_state import ParallelContext
from mindie_llm.models.config import ArchConfigError, LlamaArchConfig
from mindie_llm.models.llama import LlamaForCausalLM

__all__ = ["MODEL_REGISTRY", "get_model_class", "build_model", "supported_architectures"]

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def get_model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ArchConfigError("architectures", f"{architecture!r} is not supported; supported: "
                              f"{', '.join(supported_architectures())}") from None


def build_model(arch: LlamaArchConfig, parallel: ParallelContext | None = None) -> nn.Module:
    """The model of ``arch``, sharded for ``parallel`` (None = one rank)."""
    return get_model_class(arch.architecture)(arch, parallel)
