# SPDX-License-Identifier: Apache-2.0
"""Multi-node launcher: reads the deployment YAML (or a MindIE rank table) and starts torchrun on
this node with the right arguments. Run the same command on every node:

    python scripts/launch/launch.py --config configs/tp2-2node-cpu.yaml --node-rank 0   # node 0 serves
    python scripts/launch/launch.py --config configs/tp2-2node-cpu.yaml --node-rank 1   # workers only

Keys (section ``parallel``): ``tensor_parallel_size`` (ranks in all), ``nnodes``, ``node_rank``
(``--node-rank`` overrides it), ``master_addr``, ``master_port`` (node 0's rendezvous),
``join_timeout_s`` (how long node 0 waits for the others). Each node runs
``tensor_parallel_size / nnodes`` ranks; global rank 0 runs ``mindie-llm serve`` and the others
run the worker loop (``scripts/launch/rank_entry.py``).

``--rank-table FILE`` takes a rank table in the MindIE JSON shape instead (``server_count``,
``server_list[].server_id`` / ``container_ip``, ``server_list[].device[].rank_id``): the node
count, the ranks per node and the master address come from it, and this node is the server whose
address is ``--node-addr`` (or whose position is ``--node-rank``).

``--dry-run`` prints the torchrun command and exits. Exit code: torchrun's (non-zero when any rank
failed); a bad YAML or rank table exits 2 with one line naming the key.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(_HERE)), "python"))


class LaunchError(ValueError):
    """A deployment or rank table that cannot be launched; the message names the key."""


@dataclass(frozen=True)
class Plan:
    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int
    join_timeout_s: float


def _int(v, key: str) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise LaunchError(f"{key}: must be an integer; got {v!r}") from None


def plan_from_config(parallel, node_rank: int | None = None) -> Plan:
    tp, nnodes = parallel.tensor_parallel_size, parallel.nnodes
    rank = parallel.node_rank if node_rank is None else node_rank
    if not 0 <= rank < nnodes:
        raise LaunchError(f"parallel.node_rank: {rank} is not in [0, nnodes={nnodes})")
    if tp % nnodes:
        raise LaunchError(f"parallel.tensor_parallel_size: {tp} ranks do not split evenly over nnodes={nnodes}")
    return Plan(nnodes, rank, tp // nnodes, parallel.master_addr, parallel.master_port, parallel.join_timeout_s)


def plan_from_rank_table(table: dict, *, node_addr: str | None, node_rank: int | None, master_port: int,
                         join_timeout_s: float) -> tuple[Plan, int]:
    """(plan, tensor_parallel_size) from a MindIE rank table."""
    if not isinstance(table, dict):
        raise LaunchError("rank table: must be a JSON object")
    servers = table.get("server_list")
    if not isinstance(servers, list) or not servers:
        raise LaunchError("rank table: server_list must be a non-empty list")
    count = _int(table.get("server_count", len(servers)), "rank table: server_count")
    if count != len(servers):
        raise LaunchError(f"rank table: server_count is {count} but server_list has {len(servers)} entries")
    ranks, per_node, addrs = [], [], []
    for i, s in enumerate(servers):
        if not isinstance(s, dict) or not isinstance(s.get("device"), list) or not s["device"]:
            raise LaunchError(f"rank table: server_list[{i}].device must be a non-empty list")
        addr = s.get("container_ip") or s.get("server_id")
        if not isinstance(addr, str) or not addr:
            raise LaunchError(f"rank table: server_list[{i}] needs server_id or container_ip")
        addrs.append(addr)
        per_node.append(len(s["device"]))
        for j, d in enumerate(s["device"]):
            if not isinstance(d, dict):
                raise LaunchError(f"rank table: server_list[{i}].device[{j}] must be an object")
            ranks.append(_int(d.get("rank_id"), f"rank table: server_list[{i}].device[{j}].rank_id"))
    if len(set(per_node)) != 1:
        raise LaunchError(f"rank table: every server must list the same number of devices; got {per_node}")
    if ranks != list(range(len(ranks))):
        raise LaunchError("rank table: rank_id must run 0..N-1 in server order (node 0 holds rank 0)")
    if node_rank is None:
        if node_addr is None:
            raise LaunchError("rank table: pass --node-addr (this node's server_id / container_ip) or --node-rank")
        if node_addr not in addrs:
            raise LaunchError(f"rank table: --node-addr {node_addr} is not in server_list ({', '.join(addrs)})")
        node_rank = addrs.index(node_addr)
    if not 0 <= node_rank < count:
        raise LaunchError(f"--node-rank: {node_rank} is not in [0, server_count={count})")
    return Plan(count, node_rank, per_node[0], addrs[0], master_port, join_timeout_s), len(ranks)


def torchrun_argv(plan: Plan, config_path: str | None, overrides: list[str]) -> list[str]:
    entry = os.path.join(_HERE, "rank_entry.py")
    argv = [sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={plan.nnodes}", f"--node-rank={plan.node_rank}", f"--nproc-per-node={plan.nproc_per_node}",
            f"--master-addr={plan.master_addr}", f"--master-port={plan.master_port}",
            "--max-restarts=0", "--monitor-interval=0.5",
            f"--rdzv-conf=timeout={max(1, int(plan.join_timeout_s))}", entry]
    if config_path:
        argv += ["--config", config_path]
    for o in overrides:
        argv += ["--set", o]
    return argv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", "-c", default=None, help="deployment YAML (the same file on every node)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--node-rank", type=int, default=None, help="this node's index (overrides parallel.node_rank)")
    ap.add_argument("--rank-table", default=None, help="MindIE rank table JSON (instead of the parallel keys)")
    ap.add_argument("--node-addr", default=None, help="with --rank-table: this node's address in it")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    from mindie_llm.config import ConfigError, EngineConfig

    try:
        cfg = EngineConfig.from_yaml(args.config, args.set) if args.config else EngineConfig.from_overrides(args.set)
        overrides = list(args.set)
        if args.rank_table:
            try:
                with open(args.rank_table, encoding="utf-8") as f:
                    table = json.load(f)
            except (OSError, ValueError) as e:
                raise LaunchError(f"rank table {args.rank_table}: cannot be read as JSON: {e}") from None
            plan, tp = plan_from_rank_table(table, node_addr=args.node_addr, node_rank=args.node_rank,
                                            master_port=cfg.parallel.master_port,
                                            join_timeout_s=cfg.parallel.join_timeout_s)
            overrides += [f"parallel.tensor_parallel_size={tp}", f"parallel.nnodes={plan.nnodes}",
                          f"parallel.master_addr={plan.master_addr}"]
        else:
            plan = plan_from_config(cfg.parallel, args.node_rank)
        overrides.append(f"parallel.node_rank={plan.node_rank}")
    except (ConfigError, LaunchError) as e:
        print(f"launch: error: {e}", file=sys.stderr, flush=True)
        return 2
    cmd = torchrun_argv(plan, args.config, overrides)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    import tempfile

    fd, pidfile = tempfile.mkstemp(prefix="mindie-rank0-", suffix=".pid")
    os.close(fd)
    from mindie_llm.distributed.comm_env import with_comm_env

    # every rank (torchrun's children inherit this) runs with NVLink multicast off
    proc = subprocess.Popen(cmd, env=with_comm_env(MINDIE_RANK0_PIDFILE=pidfile))

    def forward(sig, _frame):
        # on node 0 the signal goes to rank 0 (the server): it drains, then stops every rank, and
        # torchrun exits 0; elsewhere (or before rank 0 is up) to torchrun, which stops this node
        if proc.poll() is not None:
            return
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if plan.node_rank == 0 and pid > 0:
            try:
                os.kill(pid, sig)
                return
            except ProcessLookupError:
                pass
        proc.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        code = proc.wait()
        with open(pidfile) as f:
            started = bool(f.read().strip())
    finally:
        try:
            os.unlink(pidfile)
        except OSError:
            pass
    if code:
        why = ""
        if plan.node_rank == 0 and not started:
            why = (f": the ranks never started: not every node joined the rendezvous at {plan.master_addr}:"
                   f"{plan.master_port} within parallel.join_timeout_s={plan.join_timeout_s:g} s (run launch.py "
                   "on every node with the same parallel section)")
        print(f"launch: node {plan.node_rank}: torchrun exited with code {code}{why}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
