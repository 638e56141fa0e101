# SPDX-License-Identifier: Apache-2.0
"""``load_model(model_config, device, dtype) -> LoadedModel(model, arch, tokenizer, name)``.

Formats: a Hugging Face directory (config.json + safetensors, sharded too), a GGUF file (through
``gguf``), or dummy random weights (a named shape, an HF directory's config, or a config dict).
With no model named, the embedded default SmolLM2-135M-Instruct GGUF is used. Pickle checkpoints
are refused. Every failure is a ``LoaderError`` (a ValueError) naming the file or tensor.

Sharded loading: with a ``parallel`` context of size N the model is built with this rank's shards
and every parameter's ``weight_loader`` keeps its slice. From safetensors each tensor is opened as
a lazy slice, so a rank reads only its bytes; GGUF tensors are dequantized whole and narrowed;
dummy weights are drawn per shard (seeded by seed and rank: the same seed and tensor_parallel_size
give the same weights, a different size gives different ones).

Quantized checkpoints: ``quantization_config`` in config.json selects a scheme of layers/quant_*.py
(``loader/quant_config.py``), prepared before the tensors load and finished after.

May import models, layers and tokenizer; must not import the engine, executor or server.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from mindie_llm.distributed.parallel_state import ParallelContext
from mindie_llm.loader.default_model import DEFAULT_MODEL_NAME, default_model_path
from mindie_llm.loader.dummy import NAMED_SHAPES, init_dummy_weights, named_shape
from mindie_llm.loader.errors import (CorruptCheckpointError, DefaultModelMissingError, LoaderError,
                                      ModelNotFoundError, UnsafeCheckpointError, WeightMismatchError)
from mindie_llm.loader.safetensors_loader import (PICKLE_SUFFIXES, iter_safetensors, read_hf_config,
                                                  refuse_pickle, safetensors_files)
from mindie_llm.models.config import ArchConfigError, LlamaArchConfig
from mindie_llm.models.llama import UnknownWeightError
from mindie_llm.models.registry import build_model
from mindie_llm.tokenizer.tokenizer import Tokenizer, TokenizerError

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "load_model", "resolve_format", "resolve_dtype", "build_empty_model",
           "LoaderError", "ModelNotFoundError", "UnsafeCheckpointError", "CorruptCheckpointError",
           "WeightMismatchError", "DefaultModelMissingError", "default_model_path", "NAMED_SHAPES"]


@dataclass
class LoadedModel:
    model: nn.Module              # LlamaForCausalLM, on the device, in eval mode
    arch: LlamaArchConfig
    tokenizer: Tokenizer | None   # None only for dummy weights without a tokenizer
    name: str                     # served model name


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: Any, device: torch.device, arch: LlamaArchConfig | None = None) -> torch.dtype:
    """``torch.dtype`` or "auto" / "float32" / "bfloat16" / "float16". "auto" is float32 on the CPU,
    else the checkpoint's dtype (bfloat16 when it has none or it is float32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cpu":
            return torch.float32
        ckpt = (arch.torch_dtype if arch else None) or "bfloat16"
        return _DTYPES.get(ckpt, torch.bfloat16) if ckpt != "float32" else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"model.dtype: must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def resolve_format(path: str | None, load_format: str = "auto") -> tuple[str, str | None]:
    """(format, path): format is "gguf", "safetensors" or "dummy"; ``None`` path = the default model."""
    if load_format == "dummy":
        return "dummy", path
    if path is None:
        return "gguf", default_model_path()
    if path.endswith(PICKLE_SUFFIXES):
        refuse_pickle(path)
    if not os.path.exists(path):
        raise ModelNotFoundError(path, "no such file or directory (model.path must be a Hugging Face "
                                       "directory or a .gguf file)")
    if os.path.isdir(path):
        if not os.access(path, os.R_OK | os.X_OK):
            raise ModelNotFoundError(path, "directory is not readable")
        if load_format == "gguf":
            ggufs = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
            if not ggufs:
                raise ModelNotFoundError(path, "load_format is gguf but the directory has no .gguf file")
            return "gguf", os.path.join(path, ggufs[0])
        return "safetensors", path
    if path.endswith(".gguf") or load_format == "gguf":
        return "gguf", path
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf", path
    raise ModelNotFoundError(path, "not a model: expected a Hugging Face directory or a .gguf file")


def build_empty_model(arch: LlamaArchConfig, device: torch.device, dtype: torch.dtype,
                      parallel: ParallelContext | None = None) -> nn.Module:
    """The model (this rank's shard of it) with uninitialized parameters of ``dtype`` on ``device``
    (rotary caches in fp32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
    try:
        with torch.device(device):
            model = build_model(arch, parallel)
    finally:
        torch.set_default_dtype(old)
    return model.train(False)  # inference mode of the module (dropout off)


def _load_weights(model: nn.Module, weights: Iterable[tuple[str, str, torch.Tensor]]) -> None:
    current = [None, None]  # (file, tensor) being loaded, for error messages

    def named() -> Iterable[tuple[str, torch.Tensor]]:
        for file, name, tensor in weights:
            current[0], current[1] = file, name
            yield name, tensor

    try:
        loaded = model.load_weights(named())
    except UnknownWeightError:
        raise WeightMismatchError(current[0], "no parameter of the model matches this tensor (wrong "
                                              "architecture?)", tensor=current[1]) from None
    except LoaderError:
        raise
    except ValueError as e:
        raise WeightMismatchError(current[0], str(e).split(": ", 1)[-1], tensor=current[1]) from None
    missing = model.missing_parameters(loaded)
    if missing:
        raise WeightMismatchError(current[0], f"the checkpoint lacks {len(missing)} tensor(s) "
                                  f"the config needs, e.g. {', '.join(missing[:3])}")


def _arch_from(cfg: Mapping[str, Any], source: str) -> LlamaArchConfig:
    try:
        return LlamaArchConfig.from_hf_config(cfg, source=source)
    except ArchConfigError:
        raise
    except ValueError as e:
        raise WeightMismatchError(source, str(e)) from None


def _load_hf(path: str, device: torch.device, dtype: Any, progress: bool, parallel: ParallelContext,
             asked: str | None = None):
    from mindie_llm.loader.quant_config import choose_scheme, detect_quantization

    cfg = read_hf_config(path)
    source = os.path.join(path, "config.json")
    arch = _arch_from(cfg, source)
    files = safetensors_files(path)
    model = build_empty_model(arch, device, resolve_dtype(dtype, device, arch), parallel)
    chosen = choose_scheme(asked, detect_quantization(cfg, source), source)
    scheme = None
    if chosen is not None and not chosen[1].get("from_float"):
        scheme = _checkpoint_scheme(model, chosen, source)
    weights = iter_safetensors(files, lazy=parallel.size > 1)
    if progress:
        from tqdm import tqdm

        weights = tqdm(weights, desc=f"Loading {os.path.basename(path.rstrip('/'))}", unit="tensor", leave=False)
    _load_weights(model, weights)
    if scheme is not None:
        _finish_scheme(model, scheme, files[0])
    tok = None
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        tok = Tokenizer.from_hf_dir(path, extra_eos_token_ids=arch.eos_token_ids)
    return model, arch, tok


def _load_gguf(path: str, device: torch.device, dtype: Any, progress: bool, parallel: ParallelContext,
               scheme: Any = None):
    from mindie_llm.loader.gguf_loader import gguf_arch_dict, iter_gguf_tensors, open_gguf, read_gguf_metadata

    reader = open_gguf(path)
    try:
        meta = read_gguf_metadata(reader)
        cfg = gguf_arch_dict(meta, path)
        names = {t.name for t in reader.tensors}
        cfg["tie_word_embeddings"] = "output.weight" not in names
        arch = _arch_from(cfg, path)
        model = build_empty_model(arch, device, resolve_dtype(dtype, device, arch), parallel)
        blocks = scheme is not None and scheme.name == "gguf"
        if blocks:
            try:
                scheme.prepare(model)
            except ValueError as e:
                raise WeightMismatchError(path, str(e)) from None
            blocks = scheme.active
        _load_weights(model, ((path, n, t) for n, t in iter_gguf_tensors(reader, path, cfg, progress and not blocks,
                                                                         quantized=blocks)))
        if blocks:
            try:
                scheme.process_weights_after_loading(model)
            except ValueError as e:
                name, _, msg = str(e).partition(": ")
                raise CorruptCheckpointError(path, msg, tensor=name) from None
    finally:
        reader.close()
    try:
        tok = Tokenizer.from_gguf_fields(meta, name=path)
    except TokenizerError as e:
        raise CorruptCheckpointError(path, f"tokenizer: {e}") from None
    return model, arch, tok


def _load_dummy(path: str | None, device: torch.device, dtype: Any, seed: int,
                hf_config: Mapping[str, Any] | None, parallel: ParallelContext):
    tok = None
    if hf_config is not None:
        cfg, source = dict(hf_config), "<config dict>"
    elif path is None or named_shape(path) is not None:
        cfg, source = named_shape(path or "smollm2-135m"), path or "smollm2-135m"
    elif os.path.isdir(path):
        cfg, source = read_hf_config(path), os.path.join(path, "config.json")
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            tok = Tokenizer.from_hf_dir(path)
    else:
        raise ModelNotFoundError(path, f"dummy weights need a named shape ({', '.join(NAMED_SHAPES)}) "
                                       "or a directory with config.json")
    arch = _arch_from(cfg, source)
    model = build_empty_model(arch, device, resolve_dtype(dtype, device, arch), parallel)
    init_dummy_weights(model, seed if parallel.size == 1 else seed + 1_000_003 * (parallel.rank + 1))
    return model, arch, tok


def _checkpoint_scheme(model: nn.Module, chosen: tuple[str, dict], source: str) -> Any:
    """Builds a quantized-checkpoint scheme (layers/quant_*.py) and prepares ``model`` for it."""
    from mindie_llm.layers.quantization import get_scheme

    try:
        scheme = get_scheme(chosen[0], **chosen[1])
        scheme.prepare(model)
    except ValueError as e:
        raise WeightMismatchError(source, str(e)) from None
    return scheme


def _finish_scheme(model: nn.Module, scheme: Any, source: str) -> None:
    try:
        scheme.process_weights_after_loading(model)
    except ValueError as e:
        name, _, msg = str(e).partition(": ")
        raise CorruptCheckpointError(source, msg, tensor=name) from None


def resolve_quantization(quantization: str, fmt: str, device: torch.device) -> str:
    """"auto" -> "gguf" (compute on the file's own blocks) for a GGUF file on the CPU, else "none".

    Without the C++ kernels (``mindie_llm._cpu_kernels`` not built) the blocks would be computed by
    torch fallbacks about ten times slower than dense float32, so "auto" then picks "none" and says so.
    """
    if quantization in (None, "auto"):
        if fmt != "gguf" or torch.device(device).type != "cpu":
            return "none"
        if importlib.util.find_spec("mindie_llm._cpu_kernels") is None:
            logger.warning("mindie_llm._cpu_kernels is not built: serving dense float32 instead of the GGUF "
                           "blocks (rebuild with `make build-ext` or `pip install -e .`)")
            return "none"
        return "gguf"
    return quantization


def load_model(model_config: Any, device: torch.device | str = "cpu", dtype: Any = None, *,
               progress: bool = True, hf_config: Mapping[str, Any] | None = None,
               parallel: ParallelContext | None = None) -> LoadedModel:
    """Loads ``model_config`` (a ``config.ModelConfig``) onto ``device``.

    ``dtype`` overrides ``model_config.dtype`` when given. ``hf_config`` (dummy format only) gives
    the architecture as a config.json-shaped dict. ``parallel`` (None = one rank) selects this
    rank's shard. ``model_config.quantization``: "int8" applies weight-only int8 to every linear
    layer after loading; "gguf" computes on a GGUF file's own blocks (repacked at load, never
    expanded to float); "auto" is "gguf" for a GGUF file on the CPU at tensor-parallel size 1 and
    "none" otherwise.
    """
    device = torch.device(device)
    parallel = parallel if parallel is not None else ParallelContext.single()
    dtype = dtype if dtype is not None else getattr(model_config, "dtype", "auto")
    path = getattr(model_config, "path", None)
    fmt, path = resolve_format(path, getattr(model_config, "load_format", "auto"))
    asked = getattr(model_config, "quantization", "none")
    quant = resolve_quantization(asked, fmt, device)
    if fmt == "gguf":
        from mindie_llm.layers.quantization import get_scheme

        scheme = get_scheme(quant, optional=asked in (None, "auto"))
        model, arch, tok = _load_gguf(path, device, dtype, progress, parallel, scheme)
    elif quant == "gguf":
        raise ModelNotFoundError(path or "<dummy>", "model.quantization=gguf computes on a GGUF file's "
                                                    "blocks; this model is not a .gguf file")
    elif fmt == "dummy":
        model, arch, tok = _load_dummy(path, device, dtype, getattr(model_config, "seed", 0), hf_config, parallel)
    else:
        model, arch, tok = _load_hf(path, device, dtype, progress, parallel, asked)
    if quant in ("w8a8", "w4a16", "fp8") and (fmt != "safetensors" or not _is_quantized(model)):
        _finish_scheme(model, _checkpoint_scheme(model, (quant, {"from_float": True}), path or "<dummy>"),
                       path or "<dummy>")  # a float model quantized at load
    elif quant in ("awq", "gptq") and fmt != "safetensors":
        raise ModelNotFoundError(path or "<dummy>", f"model.quantization={quant} needs a {quant} checkpoint "
                                                    "(a Hugging Face directory)")
    if quant == "int8":
        from mindie_llm.layers.quantization import quantize_int8

        quantize_int8(model)
    tok_path = getattr(model_config, "tokenizer", None)
    if tok_path:
        from mindie_llm.loader.gguf_loader import read_gguf_metadata

        tok = (Tokenizer.from_gguf_fields(read_gguf_metadata(tok_path), name=tok_path) if tok_path.endswith(".gguf")
               else Tokenizer.from_hf_dir(tok_path))
    name = getattr(model_config, "served_model_name", None) or _default_name(fmt, path, arch)
    return LoadedModel(model=model, arch=arch, tokenizer=tok, name=name)


def _is_quantized(model: nn.Module) -> bool:
    return any(getattr(m, "_parameters", {}).get("weight", 0) is None and hasattr(m, "linear_method")
               for m in model.modules())


def _default_name(fmt: str, path: str | None, arch: LlamaArchConfig) -> str:
    if fmt == "gguf" and path is not None:
        try:
            if os.path.samefile(path, default_model_path()):
                return DEFAULT_MODEL_NAME
        except (OSError, LoaderError):
            pass
    if path is None:
        return f"dummy-{arch.model_type}"
    base = os.path.basename(path.rstrip("/"))
    return base[:-5] if base.endswith(".gguf") else base
