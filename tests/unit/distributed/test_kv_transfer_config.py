# SPDX-License-Identifier: Apache-2.0
"""The disaggregation keys: what the PD code honours is accepted, the rest refused naming the key;
the transfer secret comes from the environment and must be long enough."""
from __future__ import annotations

import pytest

from mindie_llm.config import ConfigError, EngineConfig
from mindie_llm.distributed.kv_transfer import secret_from_env


@pytest.mark.parametrize("section, value, key", [
    ({"role": "router"}, None, "disaggregation.prefill_instances"),
    ({"role": "router", "prefill_instances": "127.0.0.1:1", "decode_instances": "nohost"}, None,
     "disaggregation.decode_instances"),
    ({"kv_connector": "nccl"}, None, "disaggregation.kv_connector"),
    ({"kv_connector": "p2p", "role": "prefill"}, None, "disaggregation.transfer_group_address"),
    ({"kv_connector": "p2p", "role": "decode", "transfer_group_address": "127.0.0.1:29600"}, None,
     "disaggregation.transfer_group_size"),
    ({"kv_connector": "p2p", "role": "decode", "transfer_group_address": "127.0.0.1:29600",
      "transfer_group_size": 2, "transfer_group_rank": 2}, None, "disaggregation.transfer_group_rank"),
    ({"peer_address": "127.0.0.1:7001"}, None, "disaggregation.peer_address"),
    ({"kv_tls_cert_file": "c.pem"}, None, "disaggregation.kv_tls_cert_file"),
    ({"transfer_timeout_s": 0}, None, "disaggregation.transfer_timeout_s"),
    ({"role": "broker"}, None, "disaggregation.role"),
])
def test_refused_keys_name_themselves(section, value, key):
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_dict({"disaggregation": section})
    assert e.value.key == key


def test_roles_are_copied_to_the_scheduler():
    assert EngineConfig.from_dict({"disaggregation": {"role": "decode"}}).scheduler.role == "decode"
    cfg = EngineConfig.from_dict({"disaggregation": {"role": "router", "prefill_instances": "127.0.0.1:1",
                                                     "decode_instances": "127.0.0.1:2, 127.0.0.1:3"}})
    assert cfg.scheduler.role == "colocated"
    assert cfg.disaggregation.instance_list("decode_instances") == ["127.0.0.1:2", "127.0.0.1:3"]
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_dict({"scheduler": {"role": "prefill"}})
    assert e.value.key == "scheduler.role"


def test_secret_from_env(monkeypatch):
    monkeypatch.delenv("PD_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="PD_TEST_KEY"):
        secret_from_env("PD_TEST_KEY")
    monkeypatch.setenv("PD_TEST_KEY", "short")
    with pytest.raises(ValueError, match="too short"):
        secret_from_env("PD_TEST_KEY")
    monkeypatch.setenv("PD_TEST_KEY", "x" * 16)
    assert secret_from_env("PD_TEST_KEY") == b"x" * 16
