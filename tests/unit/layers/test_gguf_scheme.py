# SPDX-License-Identifier: Apache-2.0
"""The ``gguf`` quantization scheme end to end on a tiny GGUF written here: Q4_0 / Q4_1 / Q8_0
layers (one type per fused layer, and one fused layer of mixed types, computed as one packed
weight per type), a tied Q8_0 embedding (lookups and the LM head on the same blocks).

Oracle: the same file loaded with ``quantization="none"`` (every tensor dequantized to float32 by
the loader, then dense matmuls). Tolerance 1e-4: the kernels compute in float32 on exactly the
dequantized values, so only the summation order differs. Also: nothing is kept as a dense copy,
and a block with a non-finite scale is refused with an error naming the tensor.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from mindie_llm.config import ModelConfig  # noqa: E402
from mindie_llm.layers.attention import AttentionMetadata  # noqa: E402
from mindie_llm.layers.quantization import weight_bytes  # noqa: E402
from mindie_llm.loader import CorruptCheckpointError, load_model  # noqa: E402

H, I, HEADS, KV, VOCAB = 128, 192, 4, 2, 300
D = H // HEADS
TYPES = {0: {"attn_q": Q.Q4_1, "attn_k": Q.Q4_1, "attn_v": Q.Q4_1, "attn_output": Q.Q8_0,
             "ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_0, "ffn_down": Q.Q4_1},
         1: {"attn_q": Q.Q8_0, "attn_k": Q.Q8_0, "attn_v": Q.Q8_0, "attn_output": Q.Q4_0,
             "ffn_gate": Q.Q4_1, "ffn_up": Q.Q8_0, "ffn_down": Q.Q8_0}}  # gate/up mixed: two parts


def _write(path: str, poison: str | None = None) -> None:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    for fn, v in (("add_context_length", 128), ("add_embedding_length", H), ("add_block_count", 2),
                  ("add_feed_forward_length", I), ("add_head_count", HEADS), ("add_head_count_kv", KV),
                  ("add_rope_dimension_count", D), ("add_rope_freq_base", 10000.0),
                  ("add_layer_norm_rms_eps", 1e-5), ("add_vocab_size", VOCAB)):
        getattr(w, fn)(v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    w.add_token_merges([])
    w.add_eos_token_id(VOCAB - 1)

    def add(name: str, shape: tuple[int, ...], qtype: Q, std: float = 0.05) -> None:
        x = (rng.standard_normal(shape) * std).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, x)
            return
        data = gguf.quants.quantize(x, qtype)
        if name == poison:
            data = data.copy()
            data.reshape(shape[0], -1)[1, 1] = 0x7C   # fp16 scale of row 1, block 0 becomes inf/nan
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)

    add("token_embd.weight", (VOCAB, H), Q.Q8_0, std=0.5)               # tied: no output.weight
    shapes = {"attn_q": (H, H), "attn_k": (KV * D, H), "attn_v": (KV * D, H), "attn_output": (H, H),
              "ffn_gate": (I, H), "ffn_up": (I, H), "ffn_down": (H, I)}
    for i in range(2):
        add(f"blk.{i}.attn_norm.weight", (H,), Q.F32, std=0.1)
        add(f"blk.{i}.ffn_norm.weight", (H,), Q.F32, std=0.1)
        for name, qtype in TYPES[i].items():
            add(f"blk.{i}.{name}.weight", shapes[name], qtype)
    add("output_norm.weight", (H,), Q.F32, std=0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gguf_scheme") / "tiny.gguf")
    _write(path)
    return path


def _logits(lm, ids: torch.Tensor) -> torch.Tensor:
    arch, n, bs = lm.arch, ids.shape[0], 4
    nb = (n + bs - 1) // bs
    kv = [torch.zeros(2, nb + 1, bs, arch.num_key_value_heads, arch.head_dim) for _ in range(arch.num_hidden_layers)]
    md = AttentionMetadata.build([0], [n], [list(range(1, nb + 1))], bs)
    with torch.no_grad():
        return lm.model.compute_logits(lm.model(ids, torch.arange(n), kv, md))


def test_gguf_scheme_matches_dequantized_model(tiny):
    dense = load_model(ModelConfig(path=tiny, quantization="none"), "cpu", torch.float32, progress=False)
    fast = load_model(ModelConfig(path=tiny, quantization="gguf"), "cpu", torch.float32, progress=False)
    ids = torch.tensor([5, 260, 100, 33, 7, 258, 261, 90, 1, 2, 3])
    torch.testing.assert_close(_logits(fast, ids), _logits(dense, ids), atol=1e-4, rtol=1e-4)
    layers = fast.model.model.layers
    assert layers[0].self_attn.qkv_proj.gguf_type == 3 and layers[0].self_attn.qkv_proj.weight is None
    assert layers[0].mlp.gate_up_proj.gguf_type == 2 and layers[1].self_attn.o_proj.gguf_type == 2
    gate_up = layers[1].mlp.gate_up_proj                                 # mixed Q4_1 + Q8_0: two parts
    assert gate_up.weight is None and gate_up.gguf_parts == [(3, I), (8, I)]
    emb, head = fast.model.model.embed_tokens, fast.model.lm_head
    assert emb.weight is None and head.weight is None and head.gguf_packed is emb.gguf_packed
    assert weight_bytes(fast.model) < weight_bytes(dense.model) / 3.5      # nothing stays dense


def test_auto_is_gguf_for_a_gguf_file_on_the_cpu(tiny):
    lm = load_model(ModelConfig(path=tiny), "cpu", torch.float32, progress=False)
    assert lm.model.model.layers[0].self_attn.qkv_proj.weight is None


def test_non_finite_block_scale_is_refused_naming_the_tensor(tmp_path):
    path = str(tmp_path / "bad.gguf")
    _write(path, poison="blk.0.ffn_down.weight")
    with pytest.raises(CorruptCheckpointError, match="blk.0.ffn_down.weight.*row 1, block 0"):
        load_model(ModelConfig(path=path, quantization="gguf"), "cpu", torch.float32, progress=False)


def test_gguf_scheme_refuses_a_non_gguf_model():
    with pytest.raises(ValueError, match="gguf"):
        load_model(ModelConfig(path="smollm2-135m", load_format="dummy", quantization="gguf"), "cpu",
                   torch.float32, progress=False)
