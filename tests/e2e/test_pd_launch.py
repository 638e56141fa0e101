# SPDX-License-Identifier: Apache-2.0
"""scripts/launch/pd_launch.py plans one process per instance of the YAML (role, host, port, HTTP
off; p2p ranks prefill-first) plus the router, and ``--only`` selects one node's share. The plan
is checked against the YAML it came from (configs/pd-cpu.yaml and a two-node variant); every
planned process's overrides must build a valid EngineConfig."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from mindie_llm.config import EngineConfig

ROOT = Path(__file__).resolve().parents[2]


def _launcher():
    spec = importlib.util.spec_from_file_location("pd_launch", ROOT / "scripts" / "launch" / "pd_launch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _config(cfg: dict, sets: list[str], tmp_path: Path) -> EngineConfig:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return EngineConfig.from_yaml(str(p), [sets[i + 1] for i in range(0, len(sets), 2)])


def test_plan_of_the_cpu_example(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "pd-cpu.yaml").read_text())
    plan = _launcher()._plan(cfg, None)
    assert [n for n, _ in plan] == ["prefill:0", "decode:0", "router"]
    roles = {n: _config(cfg, sets, tmp_path) for n, sets in plan}
    assert roles["prefill:0"].disaggregation.role == "prefill" and roles["prefill:0"].server.grpc_port == 18101
    assert roles["decode:0"].server.http_port == -1 and roles["decode:0"].scheduler.role == "decode"
    assert roles["router"].disaggregation.role == "router" and roles["router"].server.http_port == 8000


def test_two_nodes_with_p2p_ranks(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "pd-cpu.yaml").read_text())
    cfg["disaggregation"].update(prefill_instances="10.0.0.1:9001,10.0.0.1:9002", decode_instances="10.0.0.2:9101",
                                 kv_connector="p2p", transfer_group_address="10.0.0.1:29600")
    launch = _launcher()
    node1 = launch._plan(cfg, {"prefill"})
    node2 = launch._plan(cfg, {"decode:0", "router"})
    assert [n for n, _ in node1] == ["prefill:0", "prefill:1"]
    assert [n for n, _ in node2] == ["decode:0", "router"]
    ranks = {n: _config(cfg, sets, tmp_path).disaggregation for n, sets in node1 + node2 if n != "router"}
    assert {n: (d.transfer_group_rank, d.transfer_group_size) for n, d in ranks.items()} == {
        "prefill:0": (0, 3), "prefill:1": (1, 3), "decode:0": (2, 3)}
    assert _config(cfg, dict(node1)["prefill:1"], tmp_path).server.host == "10.0.0.1"
