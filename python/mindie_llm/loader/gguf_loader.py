# SPDX-License-Identifier: Apache-2.0
"""GGUF loader: metadata -> LlamaArchConfig, tensors dequantized to float (F32, F16, BF16, Q8_0,
Q4_0, Q4_1 in torch; K-quants and the rest through ``gguf.quants.dequantize``) or, for a
quantization scheme that computes on the blocks (``quantized=True``), handed over as
``layers.quantization.QuantizedTensor`` (the raw blocks, rows un-permuted, plus a dequantizer),
GGUF names -> Hugging Face names, and the rotary permutation of llama Q/K weights undone exactly as
transformers' GGUF loader does, so logits match transformers on the same file.

Must not import the engine or executor (layers only for the QuantizedTensor type).
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterator

import torch

from mindie_llm.loader.errors import CorruptCheckpointError, ModelNotFoundError, WeightMismatchError
from mindie_llm.loader.gguf_reader import GGUFFile, GGUFTensorInfo, dequantize

__all__ = ["read_gguf_metadata", "open_gguf", "gguf_arch_dict", "iter_gguf_tensors"]

_SUPPORTED_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM"}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def open_gguf(path: str) -> GGUFFile:
    """Parses the GGUF file at ``path`` (metadata and tensor infos; tensor bytes stay mapped).
    Truncated or malformed files raise CorruptCheckpointError naming the file."""
    if not os.path.isfile(path):
        raise ModelNotFoundError(path, "no such file")
    if not os.access(path, os.R_OK):
        raise ModelNotFoundError(path, "not readable")
    return GGUFFile(path)


def read_gguf_metadata(path_or_file: str | GGUFFile) -> dict[str, Any]:
    f = open_gguf(path_or_file) if isinstance(path_or_file, str) else path_or_file
    return dict(f.metadata)


def gguf_arch_dict(meta: dict[str, Any], path: str) -> dict[str, Any]:
    """GGUF metadata -> a Hugging Face config.json-shaped dict."""
    arch = meta.get("general.architecture")
    if arch not in _SUPPORTED_ARCHS:
        raise WeightMismatchError(path, f"general.architecture {arch!r} is not supported; "
                                        f"supported: {', '.join(_SUPPORTED_ARCHS)}")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is None and required:
            raise CorruptCheckpointError(path, f"metadata {arch}.{key} missing")
        return v

    n_heads = get("attention.head_count", required=True)
    hidden = get("embedding_length", required=True)
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or None
    cfg: dict[str, Any] = {
        "architectures": [_SUPPORTED_ARCHS[arch]], "model_type": arch,
        "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length", required=True),
        "num_hidden_layers": get("block_count", required=True),
        "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length", 2048),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    key_len = get("attention.key_length")
    rot = get("rope.dimension_count")
    head_dim = key_len or (hidden // n_heads)
    cfg["head_dim"] = head_dim
    if rot and rot != head_dim:
        cfg["partial_rotary_factor"] = rot / head_dim
    scale_type = get("rope.scaling.type")
    if scale_type == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    window = get("attention.sliding_window")
    if window:
        cfg["sliding_window"] = window
        if arch == "qwen2":
            cfg["use_sliding_window"] = True
    return cfg


def _hf_name(name: str) -> str | None:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    if name == "rope_freqs.weight":
        return None  # llama3 rope factors: derived from metadata instead
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return name  # unknown: the model rejects it by name


def _reverse_permute(w: Any, n_head: int) -> Any:
    # Undo llama.cpp's convert_hf_to_gguf permute of Q/K rows (same as transformers' loader);
    # works on numpy arrays and torch tensors.
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def dequantize_tensor(f: GGUFFile, info: GGUFTensorInfo) -> torch.Tensor:
    """One tensor -> float32 tensor in PyTorch's [out, in] order."""
    try:
        return dequantize(f.raw(info), info.ggml_type, info.shape)
    except NotImplementedError:
        raise WeightMismatchError(f.path, f"ggml type {info.ggml_type} cannot be dequantized by the gguf "
                                          "package", tensor=info.name) from None
    except (ValueError, IndexError, RuntimeError) as e:
        raise CorruptCheckpointError(f.path, f"cannot dequantize: {e}", tensor=info.name) from None


_FLOAT_TYPES = (0, 1, 30)  # F32, F16, BF16: always dequantized (norm weights, float checkpoints)


def _quantized(f: GGUFFile, info: GGUFTensorInfo, hf: str, n_perm: int | None) -> Any:
    """The tensor's raw blocks [rows, row_bytes] (a copy: the file is closed after loading), rows
    un-permuted like the float path, and a dequantizer of exactly those rows."""
    import numpy as np

    from mindie_llm.layers.quantization import QuantizedTensor

    raw = f.raw(info)                                                     # [rows, row_bytes] view
    raw = np.ascontiguousarray(_reverse_permute(raw, n_perm)) if n_perm else raw.copy()
    shape = info.shape

    def deq() -> torch.Tensor:
        try:
            return dequantize(raw, info.ggml_type, shape)
        except NotImplementedError:
            raise WeightMismatchError(f.path, f"ggml type {info.ggml_type} cannot be dequantized by the "
                                              "gguf package", tensor=info.name) from None
        except (ValueError, IndexError, RuntimeError) as e:
            raise CorruptCheckpointError(f.path, f"cannot dequantize: {e}", tensor=info.name) from None

    return QuantizedTensor(info.name, torch.from_numpy(raw), info.ggml_type, tuple(shape), deq)


def iter_gguf_tensors(f: GGUFFile, path: str, cfg: dict[str, Any], progress: bool = False,
                      quantized: bool = False) -> Iterator[tuple[str, Any]]:
    """Yields (HF name, float32 tensor) for every tensor, Q/K un-permuted for llama-style rotary.
    With ``quantized``, 2-D tensors of a block type are yielded as QuantizedTensor instead."""
    it: Any = f.tensors
    if progress:
        from tqdm import tqdm

        it = tqdm(f.tensors, desc=f"Dequantizing {os.path.basename(path)}", unit="tensor", leave=False)
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    permuted = cfg.get("model_type") in ("llama", "mistral")  # llama.cpp permutes these only
    for info in it:
        hf = _hf_name(info.name)
        if hf is None:
            continue
        if quantized and info.ggml_type not in _FLOAT_TYPES and len(info.shape) == 2:
            n_perm = None
            if permuted and ".attn_q." in info.name:
                n_perm = n_heads
            elif permuted and ".attn_k." in info.name:
                n_perm = n_kv
            yield hf, _quantized(f, info, hf, n_perm)
            continue
        w = dequantize_tensor(f, info)                                   # [out, in] float32
        if permuted and ".attn_q." in info.name:
            w = _reverse_permute(w, n_heads)
        elif permuted and ".attn_k." in info.name:
            w = _reverse_permute(w, n_kv)
        yield hf, w
