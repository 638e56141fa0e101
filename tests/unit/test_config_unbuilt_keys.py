# SPDX-License-Identifier: Apache-2.0
"""Keys whose code does not exist yet are refused at start-up with one line naming the key (a key
that is parsed and ignored would be a defect). One case per key, with a value a user would write."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mindie_llm.config import ConfigError, EngineConfig

CASES = [
    ("parallel.tensor_parallel_size", 2),
    ("parallel.nnodes", 2),
    ("parallel.node_rank", 1),
    ("parallel.master_addr", "10.0.0.1"),
    ("parallel.master_port", 29501),
    ("parallel.micro_batch_overlap", True),
    ("scheduler.role", "prefill"),
    ("disaggregation.role", "decode"),
    ("disaggregation.kv_transfer_host", "0.0.0.0"),
    ("disaggregation.kv_transfer_port", 7000),
    ("disaggregation.peer_address", "127.0.0.1:7001"),
    ("disaggregation.auth_key_env", "MY_KEY"),
]


@pytest.mark.parametrize("key,value", CASES, ids=[k for k, _ in CASES])
def test_unbuilt_key_is_refused(key, value):
    section, name = key.split(".")
    data = {section: {name: value}}
    if key == "parallel.node_rank":
        data["parallel"]["nnodes"] = 2
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_dict(data)
    assert e.value.key in (key, "parallel.nnodes") and "not supported yet" in str(e.value)


def test_defaults_are_accepted():
    EngineConfig.from_dict({"parallel": {"tensor_parallel_size": 1}, "disaggregation": {"role": "colocated"}})


def test_serve_refuses_with_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "mindie_llm.cli", "serve", "--set", "parallel.tensor_parallel_size=2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "parallel.tensor_parallel_size" in lines[0] and "Traceback" not in proc.stderr
