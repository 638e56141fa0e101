# SPDX-License-Identifier: Apache-2.0
"""Asynchronous scheduling (scheduler.async_scheduling) on a tiny random Llama on the CPU.
Oracle: the synchronous engine on the same weights and requests: token-for-token the same greedy
and seeded outputs (every sampling mode: temperature, top-k/top-p/min-p, penalties, min_tokens,
logprobs), with requests finishing at different steps (max_tokens, stop tokens) and arriving
mid-run, so that the queued step is used, used without finished rows, and discarded."""
import numpy as np
import pytest
import torch

from mindie_llm import SamplingParams
from mindie_llm.config import ModelConfig
from mindie_llm.engine.llm_engine import LLMEngine
from mindie_llm.config import EngineConfig

TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=2)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs an NVIDIA GPU"))]


@pytest.fixture(scope="module", params=DEVICES)
def weights(request):
    from mindie_llm.backends import get_platform
    from mindie_llm.loader import load_model

    get_platform(request.param)
    model = load_model(ModelConfig(load_format="dummy", seed=3), "cpu", "float32", progress=False, hf_config=TINY)
    if request.param != "cpu":
        model.model.to(request.param)
    return model


def _engine(weights, **kw):
    dev = next(weights.model.parameters()).device.type
    base = dict(load_format="dummy", dtype="float32", max_model_len=96, block_size=4, max_num_seqs=8,
                max_num_batched_tokens=64, num_blocks=256, device=dev)
    base.update(kw)
    return LLMEngine(EngineConfig.from_kwargs(**base), loaded_model=weights)


def _requests():
    rng = np.random.default_rng(1)
    kinds = [dict(temperature=0.0), dict(temperature=0.8, seed=11), dict(temperature=1.0, top_k=8, top_p=0.9, seed=5),
             dict(temperature=0.7, min_p=0.1, seed=7, logprobs=2), dict(temperature=0.0, presence_penalty=1.5,
             frequency_penalty=1.0, repetition_penalty=1.5), dict(temperature=0.9, seed=3, min_tokens=6),
             dict(temperature=0.9, seed=21, frequency_penalty=2.0), dict(temperature=0.0, logit_bias={5: 4.0, 9: -3.0})]
    reqs = []
    for i in range(14):
        kw = dict(kinds[i % len(kinds)])
        kw["max_tokens"] = int(rng.integers(3, 24))
        if i % 4 == 1:
            kw["stop_token_ids"] = [int(t) for t in rng.integers(3, 256, 12)]   # some stop mid-run
        else:
            kw["ignore_eos"] = True
        reqs.append((rng.integers(3, 256, size=int(rng.integers(1, 20))).tolist(), SamplingParams(**kw)))
    return reqs


def _run(eng, reqs, late_at=4):
    """Half the requests first, the rest after ``late_at`` steps; returns {id: (tokens, logprobs, reason)}."""
    out = {}
    half = len(reqs) // 2
    for i, (p, sp) in enumerate(reqs[:half]):
        eng.add_request(f"r{i}", p, sp)
    steps = 0
    while eng.has_unfinished_requests() or steps <= late_at:
        if steps == late_at:
            for i, (p, sp) in enumerate(reqs[half:], start=half):
                eng.add_request(f"r{i}", p, sp)
        for o in eng.step():
            c = o.outputs[0]
            lps = [max(d.values(), key=lambda x: x.logprob).logprob for d in c.logprobs] if c.logprobs else None
            out[o.request_id] = (list(c.token_ids), lps, c.finish_reason)
        steps += 1
    return out


def test_async_engine_equals_the_synchronous_engine(weights):
    reqs = _requests()
    ref = _run(_engine(weights), reqs)
    eng = _engine(weights, async_scheduling=True)
    got = _run(eng, reqs)
    assert sorted(got) == sorted(ref)
    for rid in ref:
        assert got[rid][0] == ref[rid][0], rid
        assert got[rid][2] == ref[rid][2], rid
        if ref[rid][1] is not None:
            np.testing.assert_allclose(got[rid][1], ref[rid][1], rtol=1e-4, atol=1e-4)
    assert any(r == "stop" for _, _, r in ref.values())          # stop conditions were exercised
    runner = eng.runner
    assert runner.num_ahead_used >= 10                           # the queued step was used ...
    assert runner.num_ahead_trimmed >= 1                         # ... used without rows that finished ...
    assert runner.num_ahead_dropped >= 1                         # ... and discarded when the batch changed
    # every block back in the pool: the lookahead blocks of finished requests were freed
    st = eng.get_stats()
    assert st.num_free_kv_blocks + st.num_cached_kv_blocks >= st.num_kv_blocks - 1


def test_async_scheduling_refuses_what_it_does_not_support():
    from mindie_llm.config import ConfigError

    with pytest.raises(ConfigError) as e:
        EngineConfig.from_kwargs(async_scheduling=True, speculative__method="ngram")
    assert e.value.key == "scheduler.async_scheduling"
