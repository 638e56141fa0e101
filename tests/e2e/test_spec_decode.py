# SPDX-License-Identifier: Apache-2.0
"""Speculative decoding on the embedded SmolLM2: every proposer gives the tokens of decoding
without speculation (the oracle: the same engine settings with method none), greedy and seeded,
in one mixed batch; a stop string lands where it lands without speculation even when several
tokens are accepted at once; n-gram lookup is accepted on a prompt the answer repeats."""
import pytest
import torch

from mindie_llm import LLM, SamplingParams

pytestmark = pytest.mark.slow

TEXT = ("The river rose slowly through the night. By morning the lower streets were under water, and the "
        "baker on Mill Lane carried his flour sacks up to the attic one by one.")
PROMPTS = [f"Repeat the following text exactly:\n\n{TEXT}", "Name three colors.", f"Summarize: {TEXT}"]


@pytest.fixture(scope="module")
def loaded():
    from mindie_llm.config import ModelConfig
    from mindie_llm.loader import load_model

    return load_model(ModelConfig(dtype="float32"), "cpu", "float32", progress=False)


@pytest.fixture(scope="module")
def eagle_dir(loaded, tmp_path_factory):
    from mindie_llm.spec_decode.eagle import EagleHead, save_eagle_head

    head = EagleHead(loaded.arch)
    g = torch.Generator().manual_seed(0)
    for p in head.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)
    d = str(tmp_path_factory.mktemp("eagle"))
    save_eagle_head(head, d)
    return d


def _gen(loaded, spec, sps):
    llm = LLM(loaded_model=loaded, dtype="float32", max_model_len=512, block_size=16, speculative_config=spec)
    msgs = [[{"role": "user", "content": p}] for p in PROMPTS]
    return llm.chat(msgs, sps, use_tqdm=False), llm.engine.get_stats()


def test_every_proposer_matches_no_speculation(loaded, eagle_dir):
    sps = [SamplingParams(temperature=0, max_tokens=16), SamplingParams(temperature=0.8, seed=3, max_tokens=16),
           SamplingParams(temperature=0, max_tokens=16, stop=["lower streets"])]
    ref, _ = _gen(loaded, None, sps)
    specs = {"ngram": {"method": "ngram", "num_speculative_tokens": 4, "ngram_min": 2},
             "draft": {"method": "draft", "draft_model": "target-layers:6", "num_speculative_tokens": 3},
             "eagle": {"method": "eagle", "draft_model": eagle_dir, "num_speculative_tokens": 2}}
    for name, spec in specs.items():
        outs, st = _gen(loaded, spec, sps)
        for r, o in zip(ref, outs):
            assert o.outputs[0].token_ids == r.outputs[0].token_ids, name
            assert o.outputs[0].text == r.outputs[0].text, name
            assert o.outputs[0].finish_reason == r.outputs[0].finish_reason, name
        assert st.spec_num_draft_tokens > 0, name
        if name == "ngram":                   # the repeat prompt copies its input
            assert st.spec_acceptance_rate > 0.3, st
