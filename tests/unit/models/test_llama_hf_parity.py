# SPDX-License-Identifier: Apache-2.0
"""Issue correctness #2: tiny random Llama-family configs (MHA, GQA, MQA, tied and untied
embeddings, Qwen2 qkv bias, llama3 rope scaling, Mistral sliding window) give logits within 1e-4
(fp32) of transformers on the same weights. The oracle is transformers' own model; the weights go
through a safetensors directory and our HF loader. Prefill, chunked prefill, decode steps and a
mixed decode + prefill batch are all compared."""
from __future__ import annotations

import pytest
import torch
import transformers

from mindie_llm import ops
from mindie_llm.backends.cpu import ops as cpu_ops
from mindie_llm.config import ModelConfig
from mindie_llm.layers.attention import AttentionMetadata
from mindie_llm.loader import load_model

ATOL = 1e-4
BLOCK = 4
VOCAB = 97

BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
            max_position_embeddings=128, rms_norm_eps=1e-5)

CONFIGS = {
    "llama-mha-untied": ("LlamaConfig", "LlamaForCausalLM",
                         dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    "llama-gqa-tied": ("LlamaConfig", "LlamaForCausalLM",
                       dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-mqa": ("LlamaConfig", "LlamaForCausalLM",
                  dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)),
    "llama3-rope-scaling": ("LlamaConfig", "LlamaForCausalLM",
                            dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                 rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                   high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama-attention-bias": ("LlamaConfig", "LlamaForCausalLM",
                             dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True)),
    "qwen2-qkv-bias": ("Qwen2Config", "Qwen2ForCausalLM",
                       dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral-sliding-window": ("MistralConfig", "MistralForCausalLM",
                               dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12, sliding_window=5)),
}


def _randomize_biases(model: torch.nn.Module) -> None:
    # transformers initializes biases to zero; random ones make the bias paths observable.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    cfg_cls, model_cls, extra = CONFIGS[request.param]
    torch.manual_seed(1234)
    cfg = getattr(transformers, cfg_cls)(**BASE, **extra)
    hf = getattr(transformers, model_cls)._from_config(cfg, attn_implementation="eager").float().eval()
    _randomize_biases(hf)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    ours = load_model(ModelConfig(path=str(path)), "cpu", torch.float32, progress=False)
    return request.param, hf, ours


@pytest.fixture(params=["reference", "cpu-backend"])
def backend(request):
    """Runs a test on the reference ops and again on the CPU backend's ops."""
    saved = ops.registered_backends().get("cpu")
    ops.unregister_backend("cpu")
    if request.param == "cpu-backend":
        ops.register_backend("cpu", cpu_ops)
    yield request.param
    ops.unregister_backend("cpu")
    if saved is not None:
        ops.register_backend("cpu", saved)


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()  # [L, V]


class _Runner:
    """Feeds steps to our model with a paged KV cache and scattered block tables."""

    def __init__(self, ours, num_blocks: int = 40):
        arch = ours.arch
        self.model = ours.model
        self.kv = [torch.zeros(2, num_blocks, BLOCK, arch.num_key_value_heads, arch.head_dim)
                   for _ in range(arch.num_hidden_layers)]
        self.free = list(range(num_blocks - 1, 0, -1))
        self.tables: dict[str, list[int]] = {}

    def step(self, reqs: list[tuple[str, list[int], int]]) -> torch.Tensor:
        """reqs: (name, all token ids so far, num_computed); computes tokens[num_computed:]."""
        computed, scheduled, tables, ids, pos = [], [], [], [], []
        for name, toks, c in reqs:
            table = self.tables.setdefault(name, [])
            while len(table) * BLOCK < len(toks):
                table.append(self.free.pop())
            computed.append(c)
            scheduled.append(len(toks) - c)
            tables.append(table)
            ids += toks[c:]
            pos += list(range(c, len(toks)))
        md = AttentionMetadata.build(computed, scheduled, tables, BLOCK)
        with torch.no_grad():
            hidden = self.model(torch.tensor(ids), torch.tensor(pos), self.kv, md)
            return self.model.compute_logits(hidden)  # [T, V]


def test_prefill_chunked_prefill_and_decode_match_transformers(pair, backend):
    name, hf, ours = pair
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, VOCAB, (13,), generator=g).tolist()
    want = _hf_logits(hf, prompt)

    # one whole prefill
    r = _Runner(ours)
    torch.testing.assert_close(r.step([("a", prompt, 0)]), want, atol=ATOL, rtol=0)

    # chunked prefill 5 + 5 + 3, then 3 decode steps
    r = _Runner(ours)
    got = torch.cat([r.step([("a", prompt[:5], 0)]), r.step([("a", prompt[:10], 5)]),
                     r.step([("a", prompt, 10)])])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    toks = list(prompt)
    for _ in range(3):
        toks.append(int(torch.randint(0, VOCAB, (1,), generator=g)))
        logits = r.step([("a", toks, len(toks) - 1)])
        torch.testing.assert_close(logits[0], _hf_logits(hf, toks)[-1], atol=ATOL, rtol=0)


def test_mixed_batch_of_decodes_and_prefill_chunks_matches_transformers(pair, backend):
    name, hf, ours = pair
    g = torch.Generator().manual_seed(11)
    a = torch.randint(0, VOCAB, (9,), generator=g).tolist()
    b = torch.randint(0, VOCAB, (6,), generator=g).tolist()
    c = torch.randint(0, VOCAB, (1,), generator=g).tolist()   # one-token prompt
    r = _Runner(ours)
    r.step([("a", a, 0), ("b", b[:4], 0)])
    a2 = a + [3]
    # batch: decode of a, then b's second chunk, then c's whole one-token prompt
    logits = r.step([("a", a2, len(a)), ("b", b, 4), ("c", c, 0)])
    torch.testing.assert_close(logits[0], _hf_logits(hf, a2)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1:3], _hf_logits(hf, b)[4:], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[3], _hf_logits(hf, c)[0], atol=ATOL, rtol=0)


def test_arch_config_read_from_directory(pair):
    name, hf, ours = pair
    arch = ours.arch
    assert arch.num_key_value_heads == hf.config.num_key_value_heads
    assert arch.tie_word_embeddings == bool(hf.config.tie_word_embeddings)
    if name.startswith("qwen2"):
        assert arch.qkv_bias and not arch.o_bias
    if name.startswith("mistral"):
        assert arch.sliding_window == 5
    if name == "llama3-rope-scaling":
        assert arch.rope_scaling["rope_type"] == "llama3"
