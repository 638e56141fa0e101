# SPDX-License-Identifier: Apache-2.0
"""Speculative decoding gives exactly the tokens of decoding without it (fast, tiny random Llamas).

Oracle: the same prompts and sampling parameters run with ``speculative.method: none``. Every
proposer (n-gram, a layer-truncated copy of the target as draft model, an EAGLE head with random
weights loaded from a saved checkpoint) must reproduce greedy and seeded outputs token for token,
in mixed batches, with chunked prefill, prefix caching and forced preemption; and must actually
have proposed and had tokens accepted (else the test proves nothing). Stop tokens, EOS,
max_tokens and min_tokens must land where they land without speculation; an abort while
lookahead slots are held must free every block.
"""
import numpy as np
import pytest
import torch

from mindie_llm import LLM, SamplingParams
from mindie_llm.config import ModelConfig

TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=2)
TINY_MQA = dict(TINY, hidden_size=48, num_attention_heads=3, num_key_value_heads=1, num_hidden_layers=3,
                tie_word_embeddings=True, attention_bias=True)


def _weights(cfg, seed):
    from mindie_llm.loader import load_model

    return load_model(ModelConfig(load_format="dummy", seed=seed), "cpu", "float32", progress=False, hf_config=cfg)


@pytest.fixture(scope="module")
def weights():
    return _weights(TINY, 3)


@pytest.fixture(scope="module")
def eagle_dir(weights, tmp_path_factory):
    from mindie_llm.spec_decode.eagle import EagleHead, save_eagle_head

    head = EagleHead(weights.arch)
    g = torch.Generator().manual_seed(0)
    for p in head.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    d = str(tmp_path_factory.mktemp("eagle"))
    save_eagle_head(head, d)
    return d


def _llm(w, spec=None, **kw):
    base = dict(load_format="dummy", dtype="float32", max_model_len=160, block_size=4, loaded_model=w)
    base.update(kw)
    return LLM(speculative_config=spec, **base)


def _prompts(n, seed=0):
    """Prompts that repeat themselves (so n-gram lookup finds matches), with a shared prefix."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(3, 256, size=9).tolist()
    out = []
    for i in range(n):
        base = rng.integers(3, 256, size=int(rng.integers(2, 8))).tolist()
        out.append((shared if i % 3 == 0 else []) + base * int(rng.integers(2, 5)))
    return out


def _params(n, max_tokens=16):
    return [SamplingParams(temperature=0 if i % 2 else 0.8, top_k=0 if i % 4 else 20, seed=100 + i,
                           max_tokens=max_tokens, ignore_eos=True) for i in range(n)]


def _run(llm, prompts, sps):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sps, use_tqdm=False)]


def _specs(eagle):
    return {"ngram": dict(method="ngram", num_speculative_tokens=3, ngram_max=3, auto_off_min_acceptance=0,
                          disable_by_batch_size=0),
            "draft": dict(method="draft", draft_model="target-layers:1", num_speculative_tokens=3,
                          disable_by_batch_size=0),
            "eagle": dict(method="eagle", draft_model=eagle, num_speculative_tokens=2, disable_by_batch_size=0)}


@pytest.mark.parametrize("method", ["ngram", "draft", "eagle"])
def test_identical_outputs_mixed_batch_chunked_prefix_cached_preempted(weights, eagle_dir, method):
    prompts, sps = _prompts(6), _params(6, max_tokens=12)
    ref = _run(_llm(weights), prompts, sps)
    spec = _specs(eagle_dir)[method]
    # chunked prefill (16-token budget) + prefix caching (shared prefixes)
    llm = _llm(weights, spec, max_num_batched_tokens=16, enable_prefix_caching=True)
    assert _run(llm, prompts, sps) == ref
    st = llm.engine.get_stats()
    assert st.spec_num_draft_tokens > 0 and st.spec_num_accepted_tokens > 0, st
    assert st.prefix_cache_hits > 0
    # forced preemption: a pool too small for the batch
    tight = _llm(weights, spec, num_blocks=20)
    assert _run(tight, prompts, sps) == ref
    assert tight.engine.get_stats().num_preemptions > 0


def test_draft_model_on_other_random_configs():
    w = _weights(TINY_MQA, 11)
    prompts, sps = _prompts(3, seed=4), _params(3, max_tokens=10)
    ref = _run(_llm(w), prompts, sps)
    llm = _llm(w, dict(method="draft", draft_model="target-layers:1", num_speculative_tokens=4))
    assert _run(llm, prompts, sps) == ref
    assert llm.engine.get_stats().spec_num_accepted_tokens > 0
    full = _llm(w, dict(method="draft", draft_model="target-layers:3", num_speculative_tokens=4))
    assert _run(full, prompts, sps) == ref
    st = full.engine.get_stats()       # the whole target as its own draft: greedy rows accept everything
    assert st.spec_acceptance_rate > 0.6, st


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_stops_land_on_the_right_token(weights, method):
    prompts = _prompts(3, seed=9)
    spec = _specs(None)[method]
    base = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True) for _ in prompts]
    free = _run(_llm(weights), prompts, base)
    cases = []
    for i, toks in enumerate(free):
        stop = toks[6]                                          # a token several steps in
        cases.append(SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop], ignore_eos=True))
        cases.append(SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop], min_tokens=8,
                                    ignore_eos=True))
        cases.append(SamplingParams(temperature=0, max_tokens=5 + i, ignore_eos=True))
        cases.append(SamplingParams(temperature=0.7, seed=i, max_tokens=24))      # EOS (id 2) may end it
    ps = [p for p in prompts for _ in range(4)]
    ref_llm, spec_llm = _llm(weights), _llm(weights, spec)
    ref = ref_llm.generate(ps, cases, use_tqdm=False)
    got = spec_llm.generate(ps, cases, use_tqdm=False)
    for r, g in zip(ref, got):
        assert g.outputs[0].token_ids == r.outputs[0].token_ids
        assert (g.outputs[0].finish_reason, g.outputs[0].stop_reason) == (r.outputs[0].finish_reason,
                                                                          r.outputs[0].stop_reason)
    assert spec_llm.engine.get_stats().spec_num_accepted_tokens > 0
    assert any(r.outputs[0].finish_reason == "stop" for r in ref)


def test_abort_with_lookahead_slots_frees_every_block(weights):
    llm = _llm(weights, dict(method="draft", draft_model="target-layers:2", num_speculative_tokens=4))
    eng = llm.engine
    for i, p in enumerate(_prompts(4, seed=2)):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    saw_lookahead = False
    for _ in range(8):
        eng.step()
        saw_lookahead |= eng.get_stats().spec_num_draft_tokens > 0
    assert saw_lookahead
    for i in range(4):
        eng.abort_request(f"r{i}")
    eng.step()                                       # the step message carries the aborted ids
    st = eng.scheduler.stats()
    assert st["num_free_blocks"] == eng.num_kv_blocks - 1, st
    assert not eng.has_unfinished_requests()
    spec = eng.executor.driver.speculator
    assert not spec.proposer.cache.blocks               # the draft's own KV blocks are back too


def test_no_proposals_in_a_crowded_step(weights):
    prompts, sps = _prompts(6), _params(6, max_tokens=8)
    llm = _llm(weights, dict(method="ngram", num_speculative_tokens=3, disable_by_batch_size=2))
    assert _run(llm, prompts, sps) == _run(_llm(weights), prompts, sps)
    assert llm.engine.get_stats().spec_num_draft_tokens == 0          # 6 rows sample in each step


def test_speculation_switches_itself_off_when_acceptance_is_low(weights):
    # Open (non-repeating) prompts: n-gram proposals are mostly wrong; with auto-off the target
    # verifies far fewer proposals than without it, and the output is unchanged.
    rng = np.random.default_rng(1)
    prompts = [rng.permutation(np.arange(3, 256))[:40].tolist() for _ in range(2)]
    sps = [SamplingParams(temperature=1.0, seed=i, max_tokens=30, ignore_eos=True) for i in range(2)]
    ref = _run(_llm(weights), prompts, sps)
    counts = {}
    for thr in (0.0, 0.5):
        llm = _llm(weights, dict(method="ngram", num_speculative_tokens=3, ngram_min=1, auto_off_min_acceptance=thr,
                                 auto_off_window=6, auto_off_cooldown_steps=100))
        assert _run(llm, prompts, sps) == ref
        counts[thr] = llm.engine.get_stats().spec_num_draft_tokens
    assert counts[0.0] > 0 and counts[0.5] < counts[0.0], counts
