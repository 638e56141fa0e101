# SPDX-License-Identifier: Apache-2.0
"""LLMEngine / LLM on a tiny random Llama (fast): ordering, n > 1, seeds, abort, preemption,
validation. Oracles: the same request run alone in a fresh engine (greedy and seeded outputs
depend only on the request), the scheduler's block accounting, and the documented error fields."""
import numpy as np
import pytest

from mindie_llm import LLM, SamplingParams
from mindie_llm.config import ModelConfig

TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=2)


@pytest.fixture(scope="module")
def weights():
    from mindie_llm.loader import load_model

    return load_model(ModelConfig(load_format="dummy", seed=3), "cpu", "float32", progress=False, hf_config=TINY)


def _llm(weights, **kw):
    base = dict(load_format="dummy", dtype="float32", max_model_len=128, block_size=4, loaded_model=weights)
    base.update(kw)
    return LLM(**base)


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, size=int(rng.integers(1, 30))).tolist() for _ in range(n)]


def test_outputs_in_input_order_and_batch_invariant(weights):
    prompts = _prompts(12)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = _llm(weights, max_num_batched_tokens=16)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    alone = _llm(weights, enable_prefix_caching=False)
    for i in (0, 5, 11):
        assert alone.generate([prompts[i]], sp, use_tqdm=False)[0].outputs[0].token_ids == outs[i].outputs[0].token_ids
    assert all(o.outputs[0].text == "" and o.finished for o in outs)   # dummy weights: no tokenizer


def test_seeded_and_n_samples(weights):
    llm = _llm(weights)
    p = _prompts(1, seed=5)[0]
    sp = SamplingParams(temperature=1.0, seed=99, max_tokens=8, n=3, ignore_eos=True)
    a = llm.generate([p], sp, use_tqdm=False)[0]
    b = llm.generate([p, p[:3] or [5]], [sp, SamplingParams(temperature=0.5, seed=1, max_tokens=3)],
                     use_tqdm=False)[0]
    assert len(a.outputs) == 3 and [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_forced_preemption_keeps_greedy_and_seeded_outputs(weights):
    prompts = _prompts(10, seed=7)
    sps = [SamplingParams(temperature=0 if i % 2 else 0.9, seed=i, max_tokens=12, ignore_eos=True) for i in range(10)]
    roomy = _llm(weights).generate(prompts, sps, use_tqdm=False)
    tight = _llm(weights, num_blocks=16)
    outs = tight.generate(prompts, sps, use_tqdm=False)
    assert tight.engine.get_stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in roomy]


def test_validation_and_abort(weights):
    llm = _llm(weights, max_n=2)
    eng = llm.engine
    with pytest.raises(ValueError, match="prompt_token_ids"):
        eng.add_request("a", [1, 256], SamplingParams())
    with pytest.raises(ValueError, match="prompt"):
        eng.add_request("a", "text needs a tokenizer", SamplingParams())
    with pytest.raises(ValueError, match="n"):
        eng.add_request("a", [1, 2], SamplingParams(n=3))
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request("a", [1, 2], SamplingParams(max_tokens=127))
    with pytest.raises(ValueError, match=r"prompts\[2\]"):
        llm.generate([[5], [6], [300]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not eng.has_unfinished_requests()
    eng.add_request("a", [1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="request_id"):
        eng.add_request("a", [1], SamplingParams())
    eng.step()
    eng.abort_request("a")
    assert not eng.has_unfinished_requests()
    assert eng.step() == []
    st = eng.get_stats()
    assert st.num_running == 0 and st.num_waiting == 0
