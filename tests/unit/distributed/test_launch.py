# SPDX-License-Identifier: Apache-2.0
"""scripts/launch: the torchrun command a deployment gives on each node, the MindIE rank table,
and one-line refusals of deployments that cannot be launched."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from mindie_llm.config import EngineConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
LAUNCH = os.path.join(ROOT, "scripts", "launch", "launch.py")
spec = importlib.util.spec_from_file_location("mindie_launch", LAUNCH)
launch = importlib.util.module_from_spec(spec)
sys.modules["mindie_launch"] = launch
spec.loader.exec_module(launch)


def _cfg(**parallel):
    return EngineConfig.from_dict({"parallel": parallel})


def test_plan_from_yaml_splits_ranks_over_nodes():
    p = launch.plan_from_config(_cfg(tensor_parallel_size=4, nnodes=2, master_addr="10.1.2.3",
                                     master_port=29600, join_timeout_s=30).parallel, node_rank=1)
    assert (p.nnodes, p.node_rank, p.nproc_per_node, p.master_addr, p.master_port) == (2, 1, 2, "10.1.2.3", 29600)
    argv = launch.torchrun_argv(p, "d.yaml", ["a.b=1"])
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    for flag in ("--nnodes=2", "--node-rank=1", "--nproc-per-node=2", "--master-addr=10.1.2.3",
                 "--master-port=29600", "--max-restarts=0", "--rdzv-conf=timeout=30"):
        assert flag in argv, flag
    assert argv[-4:] == ["--config", "d.yaml", "--set", "a.b=1"]


def test_uneven_split_is_refused():
    from mindie_llm.config import ConfigError

    with pytest.raises(ConfigError, match="parallel.nnodes: tensor_parallel_size=3 ranks must split evenly"):
        _cfg(tensor_parallel_size=3, nnodes=2)

    class P:   # the launcher checks again (a parallel section built elsewhere)
        tensor_parallel_size, nnodes, node_rank, master_addr, master_port, join_timeout_s = 3, 2, 0, "a", 1, 1.0

    with pytest.raises(launch.LaunchError, match="parallel.tensor_parallel_size: 3 ranks do not split evenly"):
        launch.plan_from_config(P)


TABLE = {"version": "1.0", "server_count": "2", "status": "completed", "server_list": [
    {"server_id": "10.0.0.1", "container_ip": "10.0.0.1",
     "device": [{"device_id": "0", "device_ip": "192.168.1.1", "rank_id": "0"},
                {"device_id": "1", "device_ip": "192.168.1.2", "rank_id": "1"}]},
    {"server_id": "10.0.0.2", "container_ip": "10.0.0.2",
     "device": [{"device_id": "0", "device_ip": "192.168.1.3", "rank_id": "2"},
                {"device_id": "1", "device_ip": "192.168.1.4", "rank_id": "3"}]}]}


def test_mindie_rank_table_gives_the_plan():
    plan, tp = launch.plan_from_rank_table(TABLE, node_addr="10.0.0.2", node_rank=None, master_port=29500,
                                           join_timeout_s=60)
    assert tp == 4 and (plan.nnodes, plan.node_rank, plan.nproc_per_node, plan.master_addr) == (2, 1, 2, "10.0.0.1")


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.update(server_count="3"), "server_count is 3 but server_list has 2"),
    (lambda t: t["server_list"][1]["device"].pop(), "same number of devices"),
    (lambda t: t["server_list"][1]["device"][0].update(rank_id="7"), "rank_id must run 0..N-1"),
    (lambda t: t["server_list"][0]["device"][0].update(rank_id="x"), r"device\[0\].rank_id: must be an integer"),
    (lambda t: t.update(server_list=[]), "server_list must be a non-empty list"),
])
def test_bad_rank_tables_are_refused(mutate, message):
    t = json.loads(json.dumps(TABLE))
    mutate(t)
    with pytest.raises(launch.LaunchError, match=message):
        launch.plan_from_rank_table(t, node_addr="10.0.0.1", node_rank=None, master_port=1, join_timeout_s=1)


def test_unknown_node_address_is_refused():
    with pytest.raises(launch.LaunchError, match="--node-addr 10.9.9.9 is not in server_list"):
        launch.plan_from_rank_table(TABLE, node_addr="10.9.9.9", node_rank=None, master_port=1, join_timeout_s=1)


def test_cli_dry_run_and_one_line_errors(tmp_path):
    table = tmp_path / "rt.json"
    table.write_text(json.dumps(TABLE))
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    r = subprocess.run([sys.executable, LAUNCH, "--rank-table", str(table), "--node-rank", "1", "--dry-run"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--nnodes=2 --node-rank=1 --nproc-per-node=2 --master-addr=10.0.0.1" in r.stdout
    assert "parallel.tensor_parallel_size=4" in r.stdout
    r = subprocess.run([sys.executable, LAUNCH, "--set", "parallel.tensor_parallel_size=3",
                        "--set", "parallel.nnodes=2", "--dry-run"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "parallel.nnodes" in r.stderr, r.stderr
