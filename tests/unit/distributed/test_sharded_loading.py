# SPDX-License-Identifier: Apache-2.0
"""Sharded loading without processes (construction and loading need no collective): for every
rank of TP=2 and TP=4 each parameter holds exactly its slice of the full (TP=1) tensor, checked
against slices taken here; from safetensors a rank reads only its rows / columns (a spy on the
lazy slices records every index); GGUF and dummy weights load sharded; a checkpoint of the wrong
shape is refused naming the tensor."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from mindie_llm.config import ModelConfig
from mindie_llm.distributed.parallel_state import ParallelContext
from mindie_llm.loader import load_model

transformers = pytest.importorskip("transformers")


class FakeRank(ParallelContext):
    """Rank r of a size-N group with no process group: enough to build and load a shard."""

    def __post_init__(self) -> None:
        pass


CFG = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(**CFG, attention_bias=True)
    hf = transformers.LlamaForCausalLM._from_config(cfg).float().eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith(".bias"):
                p.normal_()
    path = tmp_path_factory.mktemp("shard_model")
    hf.save_pretrained(path, safe_serialization=True)
    return str(path), {k: v.detach().clone() for k, v in hf.state_dict().items()}


def _load(path: str, rank: int, size: int):
    ctx = ParallelContext.single() if size == 1 else FakeRank(rank=rank, size=size)
    return load_model(ModelConfig(path=path), "cpu", torch.float32, progress=False, parallel=ctx).model


def _expected(full: dict, rank: int, n: int, kv_heads: int, head_dim: int = 8) -> dict[str, torch.Tensor]:
    """This rank's parameters from the full HF tensors, by the sharding rules written out."""
    def rows(t, r=rank, k=n):
        s = t.shape[0] // k
        return t[r * s:(r + 1) * s]

    out = {}
    vper = -(-CFG["vocab_size"] // n)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = full[name][rank * vper:(rank + 1) * vper]
        pad = torch.zeros(vper - w.shape[0], w.shape[1])
        out[name] = torch.cat([w, pad])
    kv_rank, kv_n = (rank, n) if kv_heads >= n else (rank // (n // kv_heads), kv_heads)
    for i in range(CFG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = (full[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv")
            out[p + f"self_attn.qkv_proj.{kind}"] = torch.cat([rows(q), rows(k, kv_rank, kv_n), rows(v, kv_rank, kv_n)])
        out[p + "self_attn.o_proj.weight"] = rows(full[p + "self_attn.o_proj.weight"].t()).t()
        out[p + "self_attn.o_proj.bias"] = full[p + "self_attn.o_proj.bias"]
        out[p + "mlp.gate_up_proj.weight"] = torch.cat([rows(full[p + "mlp.gate_proj.weight"]),
                                                        rows(full[p + "mlp.up_proj.weight"])])
        out[p + "mlp.down_proj.weight"] = rows(full[p + "mlp.down_proj.weight"].t()).t()
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[p + norm + ".weight"] = full[p + norm + ".weight"]
    out["model.norm.weight"] = full["model.norm.weight"]
    return out


@pytest.mark.parametrize("size", [2, 4])
def test_each_rank_holds_exactly_its_shard(hf_dir, size):
    path, full = hf_dir
    for rank in range(size):
        model = _load(path, rank, size)
        got = dict(model.named_parameters())
        want = _expected(full, rank, size, CFG["num_key_value_heads"])
        assert set(got) == set(want), set(got) ^ set(want)
        for name, w in want.items():
            assert torch.equal(got[name], w), f"rank {rank}/{size}: {name}"


def test_a_rank_reads_only_its_bytes(hf_dir, monkeypatch):
    """Every index a rank applies to a lazy safetensors slice covers only its shard; it never
    materializes a sharded tensor whole."""
    import safetensors

    path, full = hf_dir
    seen: list[tuple[str, tuple]] = []
    real_open = safetensors.safe_open

    class SpySlice:
        def __init__(self, name, inner):
            self.name, self.inner = name, inner

        def get_shape(self):
            return self.inner.get_shape()

        def __getitem__(self, idx):
            idx = idx if isinstance(idx, tuple) else (idx,)
            seen.append((self.name, tuple((s.start, s.stop) for s in idx)))
            return self.inner[idx]

    class SpyFile:
        def __init__(self, *a, **k):
            self.inner = real_open(*a, **k)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_slice(self, name):
            return SpySlice(name, self.f.get_slice(name))

        def get_tensor(self, name):
            raise AssertionError(f"{name}: read whole at TP > 1")

    monkeypatch.setattr(safetensors, "safe_open", SpyFile)
    _load(path, 1, 2)
    by_name = {}
    for name, idx in seen:
        by_name.setdefault(name, []).append(idx)
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert q == [((16, 32), (None, None))], q              # rows 16..32 of 32: rank 1's two heads
    assert by_name["model.layers.0.self_attn.k_proj.weight"] == [((8, 16), (None, None))]
    assert by_name["model.layers.0.self_attn.o_proj.weight"] == [((None, None), (16, 32))]  # columns
    assert by_name["model.layers.0.mlp.down_proj.weight"] == [((None, None), (24, 48))]
    assert by_name["model.embed_tokens.weight"] == [((50, 99), (None, None))]   # 50 rows per rank, 49 here
    assert by_name["model.norm.weight"] == [((None, None),)]                   # replicated: whole


def test_mqa_kv_heads_are_replicated_when_tp_exceeds_them(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**CFG, "num_key_value_heads": 1})
    hf = transformers.LlamaForCausalLM._from_config(cfg).float().eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    full = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    k = full["model.layers.0.self_attn.k_proj.weight"]                        # [8, 32]: one KV head
    for rank in range(4):
        qkv = dict(_load(str(tmp_path), rank, 4).named_parameters())["model.layers.0.self_attn.qkv_proj.weight"]
        assert torch.equal(qkv[8:16], k), rank                                  # q: 1 head = 8 rows, then k


def test_gguf_and_dummy_load_sharded(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "loader"))
    from gguf_fixtures import write_tiny_gguf   # a 2-layer llama GGUF (F32, F16, Q8_0 and K-quants)

    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path)
    # Dense weights on both sides: at TP=1 the default would keep the GGUF's own blocks (no .weight).
    full = load_model(ModelConfig(path=path, quantization="none"), "cpu", torch.float32, progress=False).model
    for rank in (0, 1):
        shard = load_model(ModelConfig(path=path, quantization="none"), "cpu", torch.float32, progress=False,
                           parallel=FakeRank(rank=rank, size=2)).model
        for i in range(2):
            f, g = full.model.layers[i], shard.model.layers[i]
            cols = f.mlp.down_proj.weight.shape[1] // 2
            assert torch.equal(g.mlp.down_proj.weight, f.mlp.down_proj.weight[:, rank * cols:(rank + 1) * cols])
            q = f.self_attn.qkv_proj.weight[:f.self_attn.q_size]                # full q rows
            assert torch.equal(g.self_attn.qkv_proj.weight[:g.self_attn.q_size],
                               q[rank * g.self_attn.q_size:(rank + 1) * g.self_attn.q_size])
        v = full.arch.vocab_size
        per = -(-v // 2)
        assert torch.equal(shard.lm_head.weight[:min(per, v - rank * per)], full.lm_head.weight[rank * per:(rank + 1) * per])
    hf = dict(CFG, architectures=["LlamaForCausalLM"], model_type="llama", num_key_value_heads=1)
    d = [load_model(ModelConfig(load_format="dummy"), "cpu", torch.float32, progress=False, hf_config=hf,
                    parallel=FakeRank(rank=r, size=2)).model for r in (0, 1)]
    w = [m.model.layers[0].self_attn.qkv_proj.weight for m in d]
    assert w[0].shape == (4 * 8, 32)                                       # 2 q heads + 1 k + 1 v of 8
    assert torch.isfinite(w[0]).all() and not torch.equal(w[0], w[1])      # each shard drawn for itself


def test_wrong_checkpoint_shape_is_refused_naming_the_tensor(hf_dir, tmp_path):
    import json
    import shutil

    path, _ = hf_dir
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"gate_proj.*48.*64|gate_proj.*64.*48|checkpoint shape"):
        _load(str(bad), 0, 2)
