# SPDX-License-Identifier: Apache-2.0
"""The router -> instance SamplingParams JSON keeps logit_bias (JSON object keys are strings; the
instance must get token ids back). Oracle: the original SamplingParams."""
import pytest

from mindie_llm.sampling_params import SamplingParams
from mindie_llm.server.pd.common import params_from_json, params_to_json


def test_logit_bias_survives_the_json_hop():
    sp = SamplingParams(max_tokens=3, temperature=0.5, logit_bias={7: 100.0, 12: -3.5})
    assert params_from_json(params_to_json(sp)) == sp


def test_bad_logit_bias_keys_name_the_field():
    with pytest.raises(ValueError, match="logit_bias"):
        params_from_json('{"logit_bias": {"x": 1}}')
