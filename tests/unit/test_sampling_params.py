# SPDX-License-Identifier: Apache-2.0
"""SamplingParams validation: every out-of-range field raises a ValueError naming the field.
Oracle: the ranges documented in mindie_llm/sampling_params.py (vLLM's)."""
import math

import pytest

from mindie_llm.sampling_params import SamplingParams, SamplingParamsError


def test_defaults_are_vllm_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens) == (1, 1.0, 1.0, -1, 16)
    assert p.stop_strings == [] and not p.greedy


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan),
    ("top_k", -2), ("top_k", 1.5),
    ("min_p", -0.1), ("min_p", 1.1),
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 2.0),
    ("min_tokens", -1), ("n", 0), ("n", -3), ("n", True),
    ("logprobs", -1), ("prompt_logprobs", -2),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0),
    ("repetition_penalty", math.nan),
    ("seed", 1 << 63), ("seed", -(1 << 63) - 1), ("seed", 1.0),
    ("stop", [""]), ("stop", [1, 2]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", "2"),
    ("ignore_eos", 1),
])
def test_bad_value_names_field(field, value):
    with pytest.raises(SamplingParamsError) as ei:
        SamplingParams(**{field: value})
    assert ei.value.field == field
    assert field in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_stop_normalised_and_clone():
    p = SamplingParams(stop="###", seed=-(1 << 63), stop_token_ids=(3, 4))
    assert p.stop_strings == ["###"] and p.stop_token_ids == [3, 4]
    q = p.clone()
    assert q == p and q is not p
    assert SamplingParams(temperature=0).greedy
