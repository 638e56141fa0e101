# SPDX-License-Identifier: Apache-2.0
"""Tiny random Llama checkpoints for the quantization tests: a float HF directory, and quantized
ones written by the project's scripts/quantize.py (loaded by path, it is not a package module)."""
from __future__ import annotations

import importlib.util
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="float32")


def quantize_script():
    spec = importlib.util.spec_from_file_location("mindie_quantize_script", os.path.join(ROOT, "scripts", "quantize.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_float(seed: int = 0, **over):
    """A LoadedModel of random weights of the TINY shape (float32, CPU)."""
    from mindie_llm.config import ModelConfig
    from mindie_llm.loader import load_model

    return load_model(ModelConfig(load_format="dummy", quantization="none", seed=seed), "cpu", "float32",
                      progress=False, hf_config={**TINY, **over})


def write_float_dir(path: str, loaded) -> str:
    from safetensors.torch import save_file

    q = quantize_script()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(q.hf_config(loaded.arch), f)
    tensors = {}
    for name, mod in loaded.model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{name}.{pname}"
            for hf, rows in q._split(name, mod, p.detach()) if pname == "weight" and hasattr(mod, "linear_method") \
                    and not full.startswith("lm_head") else [(name, p.detach())]:
                tensors[f"{hf}.{pname}"] = rows.contiguous()
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return path


def write_quantized_dir(path: str, loaded, scheme: str, **kw) -> str:
    q = quantize_script()
    ids = kw.pop("calib_ids", None)
    if ids is None and scheme == "w8a8":
        ids = torch.randint(0, loaded.arch.vocab_size, (96,), generator=torch.Generator().manual_seed(1)).tolist()
    tensors, qc = q.quantize(loaded.model, loaded.arch, scheme, calib_ids=ids, **kw)
    q.write_checkpoint(path, loaded.arch, tensors, qc)
    return path
