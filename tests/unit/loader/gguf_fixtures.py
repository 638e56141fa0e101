# SPDX-License-Identifier: Apache-2.0
"""Writes tiny llama-architecture GGUF files with gguf.GGUFWriter for the loader tests: every
tensor type the loader must dequantize, a byte-level BPE vocabulary and a chat template."""
from __future__ import annotations

import numpy as np

import gguf
from gguf import GGMLQuantizationType as Q

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 256, 256, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def vocabulary() -> tuple[list[str], list[str], list[int]]:
    alphabet = _bytes_to_unicode()
    merges = ["h e", "l l", "he ll", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
    tokens = list(alphabet) + [m.replace(" ", "") for m in merges] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    return tokens, merges, types


def _kquant_bytes(rng: np.random.Generator, qtype: Q, rows: int, cols: int) -> np.ndarray:
    """Random but valid K-quant blocks (gguf cannot quantize K-types): random payload, finite
    fp16 super-block scales written at their offsets."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    nblocks = cols // 256
    raw = rng.integers(0, 256, size=(rows, nblocks, block_bytes), dtype=np.uint8)
    scale = lambda: rng.uniform(0.001, 0.01, size=(rows, nblocks)).astype(np.float16).view(np.uint8).reshape(rows, nblocks, 2)
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q2_K):
        # Q4_K/Q5_K: d, dmin first; Q2_K: scales[16], qs[64], then d, dmin
        off = 0 if qtype != Q.Q2_K else 80
        raw[:, :, off:off + 2] = scale()
        raw[:, :, off + 2:off + 4] = scale()
    elif qtype == Q.Q6_K:
        raw[:, :, block_bytes - 2:] = scale()
    else:
        raise ValueError(qtype)
    return raw.reshape(rows, nblocks * block_bytes)


# tensor name -> type (layer tensors get {i})
LAYER_TYPES = {
    0: {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.F16, "ffn_gate": Q.BF16,
        "ffn_up": Q.Q5_0, "ffn_down": Q.Q4_K},
    1: {"attn_q": Q.Q4_1, "attn_k": Q.Q8_0, "attn_v": Q.F32, "attn_output": Q.Q5_1, "ffn_gate": Q.Q4_0,
        "ffn_up": Q.F16, "ffn_down": Q.Q6_K},
}


def write_tiny_gguf(path: str, seed: int = 0) -> dict[str, Q]:
    """A 2-layer llama GGUF; returns the type of every tensor written."""
    rng = np.random.default_rng(seed)
    tokens, merges, types = vocabulary()
    vocab = len(tokens)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 3)
    w.add_eos_token_id(vocab - 1)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    written: dict[str, Q] = {}

    def add(name: str, shape: tuple[int, ...], qtype: Q, std: float = 0.05) -> None:
        if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K):
            data = _kquant_bytes(rng, qtype, shape[0], shape[1])
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            x = (rng.standard_normal(shape) * std).astype(np.float32)
            if qtype == Q.F32:
                w.add_tensor(name, x)
            elif qtype == Q.F16:
                w.add_tensor(name, x.astype(np.float16))
            else:
                data = gguf.quants.quantize(x, qtype)
                w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        written[name] = qtype

    add("token_embd.weight", (vocab, HIDDEN), Q.F32, std=0.5)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (HIDDEN,), Q.F32, std=0.1)
        add(f"blk.{i}.ffn_norm.weight", (HIDDEN,), Q.F32, std=0.1)
        shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
                  "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
                  "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN), "ffn_down": (HIDDEN, INTER)}
        for name, qtype in LAYER_TYPES[i].items():
            add(f"blk.{i}.{name}.weight", shapes[name], qtype)
    add("output_norm.weight", (HIDDEN,), Q.F32, std=0.1)
    add("output.weight", (vocab, HIDDEN), Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written
