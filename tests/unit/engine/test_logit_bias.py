# SPDX-License-Identifier: Apache-2.0
"""``logit_bias`` through the engine (admission -> step message -> runner -> sampler) on a tiny
random Llama. Oracles: the definition (+100 forces the token, -100 bans it, greedy and seeded),
the same request without a bias (its first-position logprobs: the returned logprobs are those of
the unbiased distribution, as vLLM), the other requests of a mixed batch run alone (a bias stays
on its own rows), and the documented error field."""
import numpy as np
import pytest

from mindie_llm import LLM, SamplingParams
from mindie_llm.config import ModelConfig

V = 256
TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
            max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=2)
PROMPT = [5, 17, 99, 42, 7]


@pytest.fixture(scope="module")
def llm():
    from mindie_llm.loader import load_model

    weights = load_model(ModelConfig(load_format="dummy", seed=3), "cpu", "float32", progress=False, hf_config=TINY)
    return LLM(load_format="dummy", dtype="float32", max_model_len=128, block_size=4, loaded_model=weights)


def _gen(llm, prompts, sps):
    return [o.outputs[0] for o in llm.generate(prompts, sps, use_tqdm=False)]


SAMPLING = [dict(temperature=0.0), dict(temperature=1.0, seed=7), dict(temperature=0.8, top_k=50, top_p=0.9, seed=3)]


@pytest.mark.parametrize("kw", SAMPLING)
def test_plus_100_forces_the_token(llm, kw):
    plain = _gen(llm, [PROMPT], SamplingParams(max_tokens=8, ignore_eos=True, **kw))[0].token_ids
    target = next(t for t in (77, 78, 79) if t not in plain)
    out = _gen(llm, [PROMPT], SamplingParams(max_tokens=8, ignore_eos=True, logit_bias={target: 100}, **kw))[0]
    assert out.token_ids == [target] * 8


@pytest.mark.parametrize("kw", SAMPLING)
def test_minus_100_bans_the_tokens(llm, kw):
    # Ban all but six tokens: every output token must be one of the six.
    allowed = {3, 50, 101, 150, 201, 250}
    bias = {t: -100.0 for t in range(V) if t not in allowed}         # 250 entries (cap 300)
    out = _gen(llm, [PROMPT], SamplingParams(max_tokens=10, ignore_eos=True, logit_bias=bias, **kw))[0]
    assert len(out.token_ids) == 10 and set(out.token_ids) <= allowed, out.token_ids
    # And banning the greedy first token moves the greedy choice off it.
    first = _gen(llm, [PROMPT], SamplingParams(max_tokens=1, temperature=0))[0].token_ids[0]
    moved = _gen(llm, [PROMPT], SamplingParams(max_tokens=4, temperature=0, logit_bias={first: -100}))[0]
    assert first not in moved.token_ids


def test_logprobs_are_of_the_unbiased_distribution(llm):
    kw = dict(max_tokens=1, temperature=0, logprobs=3)
    plain = _gen(llm, [PROMPT], SamplingParams(**kw))[0]
    target = (plain.token_ids[0] + 1) % V
    biased = _gen(llm, [PROMPT], SamplingParams(logit_bias={target: 100}, **kw))[0]
    assert biased.token_ids == [target]
    p, b = plain.logprobs[0], biased.logprobs[0]
    top = {t: lp.logprob for t, lp in p.items() if lp.rank <= 3}
    assert {t: lp.logprob for t, lp in b.items() if lp.rank <= 3} == pytest.approx(top)
    assert b[target].logprob < max(top.values())          # the forced token keeps its raw logprob


def test_bias_stays_on_its_own_request_in_a_mixed_batch(llm):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, V, int(n)).tolist() for n in (3, 9, 14)]
    sps = [SamplingParams(max_tokens=6, ignore_eos=True, temperature=t, seed=i) for i, t in enumerate((0, 0.9, 0))]
    alone = [_gen(llm, [p], sp)[0].token_ids for p, sp in zip(prompts, sps)]
    biased = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0, logit_bias={9: 100, 10: -100})
    mixed = _gen(llm, prompts[:1] + [PROMPT] + prompts[1:], sps[:1] + [biased] + sps[1:])
    assert [mixed[i].token_ids for i in (0, 2, 3)] == alone
    assert mixed[1].token_ids == [9] * 6


def test_bad_logit_bias_names_the_field(llm):
    eng = llm.engine
    for bad in ({V: 1.0}, {-1: 1.0}, {1: 100.5}, {1: float("nan")}, {"1": 1.0}, {True: 1.0},
                {i: 1.0 for i in range(301)}, [1, 2]):
        with pytest.raises(ValueError, match="^logit_bias"):
            eng.add_request("x", PROMPT, SamplingParams(logit_bias=bad))
    assert not eng.has_unfinished_requests()
