# SPDX-License-Identifier: Apache-2.0
"""The ``gguf`` scheme on K-quant blocks: a tiny random Llama written here as a GGUF file whose
linears are Q4_K and Q6_K (a fused qkv of Q4_K q/k and a Q6_K v, and a Q6_K embedding tied to
the LM head, as llama.cpp's Q4_K_M files have), quantized by the simple block quantizer below (ggml's block_q4_K / block_q6_K layouts; the
gguf package cannot quantize K-quants). Oracles:

- the same file loaded with ``quantization="none"`` (every tensor dequantized to float32 by the
  gguf package, dense matmuls): logits within 1e-4 (float32 summation order only), and the same
  greedy tokens through the engine (decode path: C++ attention, rotary, the packed matmuls);
- the quantizer itself: its blocks dequantize (gguf package) to within one quantization step of
  the float weights it was given, so the blocks are a real quantization, not noise.

A non-finite super-block scale is refused naming the tensor, row and block.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from mindie_llm import LLM, SamplingParams  # noqa: E402
from mindie_llm.config import ModelConfig  # noqa: E402
from mindie_llm.layers.attention import AttentionMetadata  # noqa: E402
from mindie_llm.layers.quantization import weight_bytes  # noqa: E402
from mindie_llm.loader import CorruptCheckpointError, load_model  # noqa: E402

H, I, HEADS, KV, VOCAB = 256, 512, 4, 2, 320
D = H // HEADS


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """x[rows, k] float32 -> block_q4_K bytes [rows, k/256 * 144]: per 32 values an asymmetric 4-bit
    range (6-bit scale and min relative to the fp16 super-block d, dmin)."""
    rows, k = x.shape
    b = x.reshape(rows, k // 256, 8, 32).astype(np.float32)
    lo = np.minimum(b.min(-1), 0.0)                                      # [r, nsb, 8]
    scale = (b.max(-1) - lo) / 15.0
    mins = -lo
    d = _f16(scale.max(-1) / 63.0)
    dmin = _f16(mins.max(-1) / 63.0)
    df, dmf = d.astype(np.float32)[..., None], dmin.astype(np.float32)[..., None]
    sc = np.clip(np.rint(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(np.divide(mins, dmf, out=np.zeros_like(mins), where=dmf > 0)), 0, 63).astype(np.uint8)
    step = (df * sc)[..., None]
    q = np.rint(np.divide(b + (dmf * m)[..., None], step, out=np.zeros_like(b), where=step > 0))
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(rows, k // 256, 4, 2, 32)
    qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(rows, k // 256, 128)
    s = np.zeros((rows, k // 256, 12), np.uint8)
    s[..., 0:4] = sc[..., 0:4] | ((sc[..., 4:8] >> 4) << 6)
    s[..., 4:8] = m[..., 0:4] | ((m[..., 4:8] >> 4) << 6)
    s[..., 8:12] = (sc[..., 4:8] & 15) | ((m[..., 4:8] & 15) << 4)
    out = np.concatenate([d[..., None].view(np.uint8), dmin[..., None].view(np.uint8), s, qs], axis=-1)
    return out.reshape(rows, -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """x[rows, k] float32 -> block_q6_K bytes [rows, k/256 * 210]: per 16 values a symmetric 6-bit
    range (int8 scale relative to the fp16 super-block d)."""
    rows, k = x.shape
    b = x.reshape(rows, k // 256, 16, 16).astype(np.float32)
    scale = np.abs(b).max(-1) / 31.0                                     # [r, nsb, 16]
    d = _f16(scale.max(-1) / 127.0)
    df = d.astype(np.float32)[..., None]
    sc = np.clip(np.rint(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), -128, 127).astype(np.int8)
    step = (df * sc.astype(np.float32))[..., None]
    q = np.rint(np.divide(b, step, out=np.zeros_like(b), where=step > 0))
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(rows, k // 256, 2, 4, 32)  # [.., half, s, l]
    ql = np.concatenate([(q[:, :, :, 0] & 15) | ((q[:, :, :, 2] & 15) << 4),
                         (q[:, :, :, 1] & 15) | ((q[:, :, :, 3] & 15) << 4)], axis=-1)   # [.., half, 64]
    qh = ((q[:, :, :, 0] >> 4) | ((q[:, :, :, 1] >> 4) << 2) | ((q[:, :, :, 2] >> 4) << 4)
          | ((q[:, :, :, 3] >> 4) << 6))                                                # [.., half, 32]
    out = np.concatenate([ql.reshape(rows, -1, 128), qh.reshape(rows, -1, 64), sc.view(np.uint8),
                          d[..., None].view(np.uint8)], axis=-1)
    return out.reshape(rows, -1)


_QUANTIZE = {Q.Q4_K: quantize_q4_k, Q.Q6_K: quantize_q6_k}
TYPES = {"attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K, "attn_output": Q.Q4_K,
         "ffn_gate": Q.Q4_K, "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K}


def _write(path: str, poison: tuple[str, int] | None = None) -> None:
    rng = np.random.default_rng(1)
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
        data = _QUANTIZE[qtype](x)
        if poison is not None and name == poison[0]:   # row 1, block poison[1]: d becomes inf/nan
            data[1, poison[1] * 144 + 1 if qtype == Q.Q4_K else poison[1] * 210 + 209] = 0x7C
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)

    add("token_embd.weight", (VOCAB, H), Q.Q6_K, std=0.5)               # tied: no output.weight
    shapes = {"attn_q": (H, H), "attn_k": (KV * D, H), "attn_v": (KV * D, H), "attn_output": (H, H),
              "ffn_gate": (I, H), "ffn_up": (I, H), "ffn_down": (H, I)}
    for i in range(2):
        add(f"blk.{i}.attn_norm.weight", (H,), Q.F32, std=0.1)
        add(f"blk.{i}.ffn_norm.weight", (H,), Q.F32, std=0.1)
        for name, qtype in TYPES.items():
            add(f"blk.{i}.{name}.weight", shapes[name], qtype)
    add("output_norm.weight", (H,), Q.F32, std=0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gguf_kquants") / "tiny_k.gguf")
    _write(path)
    return path


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K])
def test_block_quantizer_is_a_real_quantization(qtype):
    x = (np.random.default_rng(0).standard_normal((8, 512)) * 0.05).astype(np.float32)
    back = gguf.quants.dequantize(_QUANTIZE[qtype](x), qtype).reshape(x.shape)
    levels = 15 if qtype == Q.Q4_K else 63
    step = 2 * np.abs(x).max() / levels
    assert np.abs(back - x).max() < step                                # within one step everywhere
    assert np.corrcoef(back.ravel(), x.ravel())[0, 1] > (0.99 if qtype == Q.Q4_K else 0.999)


def _logits(lm, ids: torch.Tensor) -> torch.Tensor:
    arch, n, bs = lm.arch, ids.shape[0], 4
    nb = (n + bs - 1) // bs
    kv = [torch.zeros(2, nb + 1, bs, arch.num_key_value_heads, arch.head_dim) for _ in range(arch.num_hidden_layers)]
    md = AttentionMetadata.build([0], [n], [list(range(1, nb + 1))], bs)
    with torch.no_grad():
        return lm.model.compute_logits(lm.model(ids, torch.arange(n), kv, md))


def test_kquant_blocks_match_dequantized_model_and_greedy_tokens(tiny):
    dense = load_model(ModelConfig(path=tiny, quantization="none"), "cpu", torch.float32, progress=False)
    fast = load_model(ModelConfig(path=tiny, quantization="gguf"), "cpu", torch.float32, progress=False)
    layers = fast.model.model.layers
    qkv = layers[0].self_attn.qkv_proj                                  # Q4_K q, k + Q6_K v: two parts
    assert qkv.weight is None and qkv.gguf_parts == [(12, H + KV * D), (14, KV * D)]
    assert layers[0].self_attn.o_proj.gguf_type == 12 and layers[0].self_attn.o_proj.weight is None
    assert layers[1].mlp.gate_up_proj.gguf_type == 12 and layers[1].mlp.down_proj.gguf_type == 14
    emb, head = fast.model.model.embed_tokens, fast.model.lm_head
    assert emb.gguf_type == 14 and emb.weight is None and head.gguf_packed is emb.gguf_packed
    assert weight_bytes(fast.model) < weight_bytes(dense.model) / 4.5    # nothing stays dense
    ids = torch.tensor([5, 260, 100, 33, 7, 258, 261, 90, 1, 2, 3])
    torch.testing.assert_close(_logits(fast, ids), _logits(dense, ids), atol=1e-4, rtol=1e-4)

    prompts = [[5, 260, 100, 33], [7, 258, 261, 90, 1, 2, 3, 44, 45], [300]]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def run(loaded):
        llm = LLM(load_format="dummy", dtype="float32", max_model_len=64, block_size=4, loaded_model=loaded)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]

    assert run(fast) == run(dense)


def test_non_finite_kquant_scale_is_refused_naming_the_tensor(tmp_path):
    for name, block in (("blk.0.ffn_gate.weight", 0), ("blk.1.ffn_down.weight", 1)):   # Q4_K, Q6_K
        path = str(tmp_path / f"bad_{name}.gguf")
        _write(path, poison=(name, block))
        with pytest.raises(CorruptCheckpointError, match=f"{name}.*row 1, block {block}"):
            load_model(ModelConfig(path=path, quantization="gguf"), "cpu", torch.float32, progress=False)
