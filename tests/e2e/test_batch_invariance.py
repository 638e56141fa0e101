# SPDX-License-Identifier: Apache-2.0
"""Correctness 3: batch invariance of greedy output on the real SmolLM2 (fp32).

Oracle: the same request run alone (one request in the engine, whole prompt in one step, no
prefix cache). Each target request must produce identical tokens inside a batch of 32 mixed
requests (different lengths, shared prefixes, seeded sampling, n=2, different max_tokens) with
chunked prefill on and off, prefix caching on and off, and with a KV pool too small for the batch
(forced preemption by recompute). The scheduler's stats prove the condition was really exercised.
"""
import pytest

from mindie_llm import LLM, SamplingParams

pytestmark = pytest.mark.slow

SYSTEM = ("You are a careful assistant. Answer briefly and precisely, and never invent facts. "
          "If a question is ambiguous, say so. ")
TOPICS = ["the moon", "volcanoes", "bread", "rivers", "chess", "bees", "glass", "trains", "salt", "clouds",
          "copper", "owls", "tea", "maps", "snow", "violins"]
TARGETS = [
    SYSTEM + "Question: why do cats purr?",
    "Count from one to five in French:",
    SYSTEM + "Question: what is the boiling point of water at sea level, and why does it change on mountains?",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _mixed_batch():
    """32 requests: the 3 targets at positions 0, 13 and 31, others of varied shape around them."""
    prompts, params = [], []
    for i in range(29):
        topic = TOPICS[i % len(TOPICS)]
        if i % 3 == 0:
            prompts.append(SYSTEM + f"Question: tell me one fact about {topic}.")
        elif i % 3 == 1:
            prompts.append(f"Write a short poem about {topic}. " * (1 + i % 4))
        else:
            prompts.append(f"{topic}?")
        if i % 4 == 0:
            params.append(SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=4 + i % 9))
        elif i % 7 == 0:
            params.append(SamplingParams(temperature=0.7, n=2, seed=i, max_tokens=6))
        else:
            params.append(SamplingParams(temperature=0.0, max_tokens=3 + i % 11))
    for pos, t in zip((0, 13, 31), TARGETS):
        prompts.insert(pos, t)
        params.insert(pos, GREEDY)
    assert len(prompts) == 32
    return prompts, params


@pytest.fixture(scope="module")
def weights():
    from mindie_llm.config import ModelConfig
    from mindie_llm.loader import load_model

    return load_model(ModelConfig(dtype="float32"), "cpu", "float32", progress=False)


@pytest.fixture(scope="module")
def alone(weights):
    llm = LLM(dtype="float32", max_model_len=512, max_num_batched_tokens=512, enable_chunked_prefill=False,
              enable_prefix_caching=False, loaded_model=weights)
    res = [llm.generate([t], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for t in TARGETS]
    assert all(len(r) == 8 for r in res)
    return res


CASES = {
    "chunked+prefix": dict(enable_chunked_prefill=True, max_num_batched_tokens=64, enable_prefix_caching=True),
    "chunked": dict(enable_chunked_prefill=True, max_num_batched_tokens=48, enable_prefix_caching=False),
    "whole+prefix": dict(enable_chunked_prefill=False, max_num_batched_tokens=512, enable_prefix_caching=True),
    "whole": dict(enable_chunked_prefill=False, max_num_batched_tokens=512, enable_prefix_caching=False),
    "preempt": dict(enable_chunked_prefill=True, max_num_batched_tokens=96, enable_prefix_caching=True,
                    num_blocks=24),
}


@pytest.mark.parametrize("case", list(CASES))
def test_target_tokens_identical_inside_mixed_batch(weights, alone, case):
    llm = LLM(dtype="float32", max_model_len=512, block_size=16, loaded_model=weights, **CASES[case])
    prompts, params = _mixed_batch()
    outs = llm.generate(prompts, params, use_tqdm=False)
    got = [outs[pos].outputs[0].token_ids for pos in (0, 13, 31)]
    assert got == alone
    stats = llm.engine.get_stats()
    if CASES[case]["enable_prefix_caching"]:
        assert stats.prefix_cache_hits > 0
    if case == "preempt":
        assert stats.num_preemptions > 0
    # Every request finished with the length asked for (n=2 gives two samples).
    for o, p in zip(outs, params):
        assert len(o.outputs) == p.n and all(len(c.token_ids) <= p.max_tokens for c in o.outputs)
    assert stats.num_running == 0 and stats.num_waiting == 0 and not llm.engine.has_unfinished_requests()
