#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Starts a prefill/decode deployment from one YAML: every prefill and decode instance listed in
``disaggregation.prefill_instances`` / ``decode_instances``, then the router.

    python scripts/launch/pd_launch.py --config configs/pd-cpu.yaml            # all on this machine
    python scripts/launch/pd_launch.py --config pd.yaml --only prefill:0,decode:1   # this node's share
    python scripts/launch/pd_launch.py --config pd.yaml --only router

Each instance is ``mindie-llm serve --config FILE`` with its role, host and gRPC port taken from
its address (HTTP off); with ``kv_connector: p2p`` it also gets its rank in the transfer group
(prefill instances first, then decode) whose store is ``transfer_group_address``. Across nodes, run the script on each node with ``--only`` naming what runs
there, the same YAML and the same MINDIE_KV_TRANSFER_KEY; instance hosts must be that node's
addresses. On one machine an unset key is replaced by a random one shared by the children.
SIGINT / SIGTERM stop every child; the script exits when the router (or, without one, every
instance) has exited.

``--devices 0,1`` places the instances on GPUs, one entry per instance in start order (prefill
instances, then decode), as each child's ``CUDA_VISIBLE_DEVICES``: one prefill on GPU 0 and one
decode on GPU 1 is ``--devices 0,1``; both on one card is ``--devices 0,0``. Instances that share a
card split ``cache.gpu_memory_utilization`` between them (each gets the YAML's value divided by the
number of instances on its card). Every child runs with NVLink multicast off (``comm_env``).
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "python"))
from mindie_llm.distributed.comm_env import with_comm_env  # noqa: E402 - after the path


def _plan(cfg: dict, only: set[str] | None) -> list[tuple[str, list[str]]]:
    d = cfg.get("disaggregation") or {}
    out = []
    lists = {role: [a.strip() for a in str(d.get(f"{role}_instances", "")).split(",") if a.strip()]
             for role in ("prefill", "decode")}
    size = len(lists["prefill"]) + len(lists["decode"])
    for role in ("prefill", "decode"):
        for i, addr in enumerate(lists[role]):
            name = f"{role}:{i}"
            if only is not None and name not in only and role not in only:
                continue
            host, _, port = addr.rpartition(":")
            sets = ["--set", f"disaggregation.role={role}", "--set", f"server.host={host}",
                    "--set", f"server.grpc_port={port}", "--set", "server.http_port=-1"]
            if d.get("kv_connector") == "p2p":   # ranks: prefill instances first, then decode
                rank = i if role == "prefill" else len(lists["prefill"]) + i
                sets += ["--set", f"disaggregation.transfer_group_rank={rank}",
                         "--set", f"disaggregation.transfer_group_size={size}"]
            out.append((name, sets))
    if only is None or "router" in only:
        out.append(("router", ["--set", "disaggregation.role=router"]))
    return out


def place(plan: list[tuple[str, list[str]]], devices: str | None, gpu_memory_utilization: float
          ) -> list[tuple[str, list[str], dict[str, str]]]:
    """Each instance of ``plan`` with its extra environment (``CUDA_VISIBLE_DEVICES``) and, where
    instances share a card, its share of the memory fraction. ``devices``: one entry per instance
    (the router gets none); ValueError naming ``--devices`` when the count differs."""
    instances = [name for name, _ in plan if name != "router"]
    if not devices:
        return [(name, sets, {}) for name, sets in plan]
    devs = [d.strip() for d in devices.split(",")]
    if len(devs) != len(instances) or not all(d.isdigit() for d in devs):
        raise ValueError(f"--devices: one GPU index per instance ({', '.join(instances)}); got {devices!r}")
    share = {d: devs.count(d) for d in devs}
    where = dict(zip(instances, devs))
    out = []
    for name, sets in plan:
        if name == "router":
            out.append((name, sets, {}))
            continue
        d = where[name]
        extra = list(sets)
        if share[d] > 1:
            extra += ["--set", f"cache.gpu_memory_utilization={gpu_memory_utilization / share[d]:.4f}"]
        out.append((name, extra, {"CUDA_VISIBLE_DEVICES": d}))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--only", default=None, help="comma-separated: router, prefill, decode, prefill:0, decode:1 ...")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="passed to every process")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--devices", default=None, help="GPU index per instance in start order (prefill, then decode), "
                   "e.g. 0,1; instances sharing a card split cache.gpu_memory_utilization")
    args = p.parse_args(argv)
    with open(args.config, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    only = set(args.only.split(",")) if args.only else None
    util = float((cfg.get("cache") or {}).get("gpu_memory_utilization", 0.9))
    for o in args.overrides:
        if o.startswith("cache.gpu_memory_utilization="):
            util = float(o.partition("=")[2])
    try:
        placed = place(_plan(cfg, only), args.devices, util)
    except ValueError as e:
        print(f"pd_launch: {e}", file=sys.stderr)
        return 2
    env = with_comm_env()
    key_env = (cfg.get("disaggregation") or {}).get("auth_key_env", "MINDIE_KV_TRANSFER_KEY")
    if not env.get(key_env):
        if only is not None:
            print(f"pd_launch: set {key_env} (the same on every node)", file=sys.stderr)
            return 2
        env[key_env] = secrets.token_hex(24)
    extra = [x for o in args.overrides for x in ("--set", o)]
    procs: list[tuple[str, subprocess.Popen]] = []

    def stop(*_: object) -> None:
        for _, pr in reversed(procs):
            if pr.poll() is None:
                pr.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for name, sets, child_env in placed:
        cmd = [sys.executable, "-m", "mindie_llm.cli", "serve", "--config", args.config, "--log-level",
               args.log_level, *extra, *sets]      # the role's own keys win
        where = f" on GPU {child_env['CUDA_VISIBLE_DEVICES']}" if child_env else ""
        print(f"pd_launch: starting {name}{where}", flush=True)
        procs.append((name, subprocess.Popen(cmd, env=with_comm_env(env, **child_env))))
    try:
        router = next((pr for n, pr in procs if n == "router"), None)
        while True:
            if router is not None and router.poll() is not None:
                break
            if router is None and all(pr.poll() is not None for _, pr in procs):
                break
            time.sleep(0.5)
    finally:
        stop()
        for _, pr in procs:
            try:
                pr.wait(30)
            except subprocess.TimeoutExpired:
                pr.kill()
    return router.returncode if router is not None else 0


if __name__ == "__main__":
    sys.exit(main())
