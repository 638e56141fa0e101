# SPDX-License-Identifier: Apache-2.0
"""Hugging Face directory loader: config.json + *.safetensors (one file or sharded with
model.safetensors.index.json). Pickle checkpoints (.bin, .pt, ...) are refused.

Must not import the engine or executor; builds models through models.registry.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

import torch

from mindie_llm.loader.errors import (CorruptCheckpointError, ModelNotFoundError,
                                      UnsafeCheckpointError)

__all__ = ["PICKLE_SUFFIXES", "read_hf_config", "safetensors_files", "iter_safetensors",
           "refuse_pickle"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickle(path: str) -> None:
    raise UnsafeCheckpointError(
        path, "pickle-based checkpoints (.bin/.pt/.pth/.ckpt/.pkl) are refused: unpickling runs "
              "arbitrary code from the file. Convert it to safetensors or GGUF.")


def read_hf_config(path: str) -> dict:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ModelNotFoundError(cfg_file, "missing: a Hugging Face model directory needs config.json")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            cfg = json.load(f)
    except OSError as e:
        raise ModelNotFoundError(cfg_file, f"cannot be read: {e.strerror}") from None
    except ValueError as e:
        raise CorruptCheckpointError(cfg_file, f"not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CorruptCheckpointError(cfg_file, "must hold a JSON object")
    return cfg


def safetensors_files(path: str) -> list[str]:
    """The safetensors files of a directory, in index order when sharded."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpointError(index, f"malformed index: {e}") from None
        files = [os.path.join(path, n) for n in names]
        for f in files:
            if os.path.dirname(os.path.abspath(f)) != os.path.abspath(path):
                raise CorruptCheckpointError(index, f"shard {f!r} points outside the model directory")
            if not os.path.isfile(f):
                raise ModelNotFoundError(f, "shard listed in model.safetensors.index.json is missing")
        return files
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        pickles = [n for n in os.listdir(path) if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            refuse_pickle(os.path.join(path, pickles[0]))
        raise ModelNotFoundError(path, "no *.safetensors weights in the directory")
    return files


def _check_header(file: str) -> None:
    """Validates the safetensors header and that every tensor's bytes lie inside the file, so that a
    truncated file fails with its name rather than deep inside a read."""
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CorruptCheckpointError(file, "truncated: shorter than the 8-byte header length")
            n = int.from_bytes(raw, "little")
            if n <= 0 or 8 + n > size or n > 100 * 1024 * 1024:
                raise CorruptCheckpointError(file, f"truncated or corrupt: header length {n} "
                                                   f"does not fit in a {size}-byte file")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelNotFoundError(file, f"cannot be read: {e.strerror}") from None
    except ValueError as e:
        if isinstance(e, CorruptCheckpointError):
            raise
        raise CorruptCheckpointError(file, f"corrupt header: {e}") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(file, "corrupt header: not a JSON object")
    data_len = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = meta["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CorruptCheckpointError(file, "corrupt header entry", tensor=name) from None
        if not 0 <= begin <= end <= data_len:
            raise CorruptCheckpointError(file, f"truncated: data [{begin}, {end}) past the end of "
                                               f"the {data_len}-byte data section", tensor=name)


def iter_safetensors(files: list[str], lazy: bool = False) -> Iterator[tuple[str, str, Any]]:
    """Yields (file, tensor name, tensor) for every tensor of every file. ``lazy``: a safetensors
    slice instead of the tensor (``get_shape()``, indexing reads only the indexed bytes), valid
    until the next item; tensor-parallel ranks use it to read only their shard."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        _check_header(file)
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield file, name, (f.get_slice(name) if lazy else f.get_tensor(name))
        except SafetensorError as e:
            raise CorruptCheckpointError(file, f"cannot be read as safetensors: {e}") from None
