# SPDX-License-Identifier: Apache-2.0
"""Proposer pieces in isolation. Oracles: hand-worked n-gram lookups; the tracker's documented
switch-off rule; an EAGLE checkpoint written with the published tensor names loads back to the
same weights and refuses unknown tensors and pickle files; the config refuses bad keys by name."""
import numpy as np
import pytest
import torch

from mindie_llm.config import ConfigError, EngineConfig
from mindie_llm.spec_decode.acceptance import AcceptanceTracker
from mindie_llm.spec_decode.ngram import ngram_lookup


def test_ngram_lookup():
    t = np.array([5, 6, 7, 8, 9, 5, 6, 7], np.int32)
    assert ngram_lookup(t, 3, 1, 3).tolist() == [8, 9, 5]          # suffix 5 6 7 seen at 0
    assert ngram_lookup(t, 9, 1, 3).tolist() == [8, 9, 5, 6, 7]    # no more than what follows
    assert ngram_lookup(np.array([1, 2, 3], np.int32), 3, 1, 3).size == 0
    t2 = np.array([1, 4, 2, 9, 1, 4, 3, 1, 4], np.int32)           # most recent earlier match wins
    assert ngram_lookup(t2, 2, 1, 2).tolist() == [3, 1]
    assert ngram_lookup(t2, 2, 3, 3).size == 0                      # min_n 3: "3 1 4" never recurs


def test_acceptance_tracker_switches_off_and_back_on():
    tr = AcceptanceTracker(min_acceptance=0.5, window=4, cooldown=3)
    tr.record(1, 2, 2)
    tr.record(1, 2, 1)
    assert tr.enabled(1)                                              # 3/4 accepted
    tr.record(1, 2, 0)
    tr.record(1, 2, 0)
    assert not tr.enabled(1)                                          # 1/4 over the window
    for _ in range(3):
        tr.tick()
    assert tr.enabled(1)
    assert tr.enabled(2)                                              # unseen requests speculate


def test_eagle_checkpoint_round_trip_and_refusals(tmp_path):
    from safetensors.torch import load_file, save_file

    from mindie_llm.config import ModelConfig
    from mindie_llm.loader import load_model
    from mindie_llm.models.llama import UnknownWeightError
    from mindie_llm.spec_decode.eagle import EagleHead, load_eagle_head, save_eagle_head

    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
               max_position_embeddings=64)
    target = load_model(ModelConfig(load_format="dummy"), "cpu", "float32", progress=False, hf_config=cfg).model
    head = EagleHead(target.arch)
    for i, p in enumerate(head.parameters()):
        p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    save_eagle_head(head, str(tmp_path / "h"))
    names = set(load_file(str(tmp_path / "h" / "model.safetensors")))
    assert {"fc.weight", "fc.bias", "layers.0.self_attn.q_proj.weight", "layers.0.mlp.gate_proj.weight",
            "layers.0.post_attention_layernorm.weight"} <= names
    back = load_eagle_head(str(tmp_path / "h"), target, "cpu")
    for (n, a), (_, b) in zip(head.named_parameters(), back.named_parameters()):
        assert torch.equal(a, b), n
    # the paged forward equals the dense (training) forward over one sequence
    from mindie_llm.ops.attention_metadata import AttentionMetadata

    N = 7
    emb, feat = torch.randn(N, 32), torch.randn(N, 32)
    kv = [torch.zeros(2, 4, 4, 2, 8)]
    md = AttentionMetadata.build([0], [N], [[1, 2]], 4)
    with torch.inference_mode():
        paged = back(emb, feat, torch.arange(N), kv, md)
        dense = back.forward_dense(emb, feat)
    torch.testing.assert_close(paged, dense, rtol=1e-4, atol=1e-4)
    # an extra tensor is named; pickle files are refused
    t = load_file(str(tmp_path / "h" / "model.safetensors"))
    t["layers.0.self_attn.bogus.weight"] = torch.zeros(1)
    (tmp_path / "bad").mkdir()
    save_file(t, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(UnknownWeightError, match="bogus"):
        load_eagle_head(str(tmp_path / "bad"), target, "cpu")
    (tmp_path / "pkl").mkdir()
    (tmp_path / "pkl" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="safetensors"):
        load_eagle_head(str(tmp_path / "pkl"), target, "cpu")


@pytest.mark.parametrize("data,key", [
    ({"method": "medusa"}, "speculative.method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "speculative.num_speculative_tokens"),
    ({"method": "ngram", "ngram_min": 3, "ngram_max": 2}, "speculative.ngram_max"),
    ({"method": "eagle"}, "speculative.draft_model"),
    ({"typo": 1}, "speculative.typo"),
])
def test_config_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_dict({"speculative": data})
    assert e.value.key == key


def test_metrics_export_acceptance():
    pytest.importorskip("prometheus_client")
    from prometheus_client import generate_latest

    from mindie_llm.outputs import EngineStats
    from mindie_llm.server.metrics import ServerMetrics

    class _Fake:
        model_name = "m"

        def get_stats(self):
            return EngineStats(spec_num_drafts=10, spec_num_draft_tokens=40, spec_num_accepted_tokens=30)

        def is_live(self):
            return True

        def add_listener(self, fn):
            pass

    text = generate_latest(ServerMetrics(_Fake()).registry).decode()
    assert 'mindie_spec_decode_acceptance_rate{model_name="m"} 0.75' in text
    assert 'mindie_spec_decode_mean_accepted_length{model_name="m"} 4.0' in text
    assert 'mindie_spec_decode_draft_tokens_total{model_name="m"} 40.0' in text
