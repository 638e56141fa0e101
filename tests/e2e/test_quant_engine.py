# SPDX-License-Identifier: Apache-2.0
"""The engine's batch-invariance and preemption checks (a small version of
test_batch_invariance.py) with each quantization scheme, on a tiny random Llama quantized by
scripts/quantize.py. Oracle: the same request run alone in the same engine configuration."""
import os
import sys

import pytest

from mindie_llm import LLM, SamplingParams
from mindie_llm.config import ModelConfig
from mindie_llm.loader import load_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unit", "layers"))
from quant_fixtures import tiny_float, write_quantized_dir  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
TARGETS = [[5, 9, 11, 40, 7] * 3, [17, 3, 99], [250, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


def _others():
    prompts, params = [], []
    for i in range(9):
        prompts.append([(i * 7 + j) % 250 + 3 for j in range(3 + (i * 5) % 17)])
        params.append(SamplingParams(temperature=0.8, seed=i, max_tokens=3 + i % 5) if i % 2 else
                      SamplingParams(temperature=0.0, max_tokens=2 + i % 6, ignore_eos=True))
    return prompts, params


SCHEMES = {"w8a8": ("w8a8", {}, "auto"), "awq": ("awq", {"group_size": 32}, "auto"),
           "gptq-act-order": ("gptq", {"group_size": 32, "act_order": True}, "auto"),
           "kv-int8": (None, {}, "int8"), "kv-fp8": (None, {}, "fp8_e4m3"),
           "fp8-at-load": ("fp8", {}, "auto")}


@pytest.mark.parametrize("name", list(SCHEMES))
def test_batch_invariance_and_preemption(tmp_path, name):
    scheme, kw, kv = SCHEMES[name]
    fp = tiny_float()
    if scheme is None:
        loaded = fp
    elif scheme == "fp8":                                  # a float model quantized at load
        from quant_fixtures import TINY

        loaded = load_model(ModelConfig(load_format="dummy", quantization="fp8", seed=0), "cpu", "float32",
                            progress=False, hf_config=TINY)
    else:
        path = write_quantized_dir(str(tmp_path / name), fp, scheme, **kw)
        loaded = load_model(ModelConfig(path=path), "cpu", "float32", progress=False)
    common = dict(dtype="float32", max_model_len=128, kv_cache_dtype=kv, loaded_model=loaded)
    alone = LLM(enable_chunked_prefill=False, enable_prefix_caching=False, max_num_batched_tokens=128, **common)
    want = [alone.generate([{"prompt_token_ids": t}], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
            for t in TARGETS]
    prompts, params = _others()
    for pos, t in zip((0, 5, 11), TARGETS):
        prompts.insert(pos, {"prompt_token_ids": t})
        params.insert(pos, GREEDY)
    prompts = [p if isinstance(p, dict) else {"prompt_token_ids": p} for p in prompts]
    llm = LLM(enable_chunked_prefill=True, max_num_batched_tokens=24, enable_prefix_caching=True,
              num_blocks=8, block_size=4, **common)                      # small pool: forced preemption
    outs = llm.generate(prompts, params, use_tqdm=False)
    got = [outs[i].outputs[0].token_ids for i in (0, 5, 11)]
    assert got == want
    stats = llm.engine.get_stats()
    assert stats.num_preemptions > 0 and stats.num_running == 0 and stats.num_waiting == 0
