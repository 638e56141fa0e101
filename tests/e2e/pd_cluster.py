# SPDX-License-Identifier: Apache-2.0
"""Helpers of the PD tests: start a router and prefill/decode instances as real ``mindie-llm
serve`` processes on free loopback ports, read their ready lines, query instances directly and
stop everything. Imported by this module's unique name (``from pd_cluster import ...``)."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_PYTHON = Path(__file__).resolve().parents[2] / "python"
SECRET = "pd-test-secret-0123456789abcdef"
ROUTER_RE = re.compile(r"mindie-llm ready: http=(\S+) grpc=(\S+) model=(\S+)")
INSTANCE_RE = re.compile(r"mindie-llm (prefill|decode) ready: grpc=(\S+) kv=(\S+)")

BASE: dict[str, Any] = {
    "model": {"dtype": "float32", "max_seq_len": 512, "served_model_name": "SmolLM2-135M-Instruct"},
    "cache": {"cache_block_size": 16, "num_blocks": 256},
    "scheduler": {"max_batch_size": 64, "max_prefill_tokens": 1024, "max_queued_requests": 512},
    "backend": {"device": "cpu", "num_threads": 1},
    "server": {"host": "127.0.0.1", "http_port": 0, "grpc_port": 0, "max_tokens_limit": 256,
               "drain_timeout_s": 5.0},
    "disaggregation": {"transfer_timeout_s": 10.0, "health_interval_s": 0.25, "max_retries": 2},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO_PYTHON), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["TQDM_DISABLE"] = "1"
    e["MINDIE_KV_TRANSFER_KEY"] = SECRET
    e.pop("MINDIE_API_KEY", None)
    return e


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen
    log_path: Path
    address: str = ""           # instance: gRPC host:port; router: HTTP url

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@dataclass
class Cluster:
    prefill: list[Proc]
    decode: list[Proc]
    router: Proc | None = None
    grpc_address: str = ""
    extra: list[Proc] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return self.router.address

    def all(self) -> list[Proc]:
        return [*self.prefill, *self.decode, *([self.router] if self.router else []), *self.extra]

    def metrics(self) -> str:
        import httpx

        return httpx.get(f"{self.http_url}/metrics", timeout=30).text

    def stats(self, p: Proc) -> Any:
        import grpc

        from mindie_llm.server.proto import mindie_pd_pb2 as pb, mindie_pd_pb2_grpc as pbg

        with grpc.insecure_channel(p.address) as ch:
            from mindie_llm.server.pd.common import service_token

            return pbg.PDInstanceStub(ch).Stats(pb.StatsRequest(), timeout=10,
                                                metadata=(("x-mindie-pd-key", service_token(SECRET.encode())),))

    def stop(self) -> None:
        for p in reversed(self.all()):
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in self.all():
            try:
                p.proc.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def _spawn(tmp: Path, name: str, config: dict[str, Any]) -> Proc:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    log = tmp / f"{name}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "mindie_llm.server.launcher", "--config", str(cfg),
                                 "--log-level", "warning"], stdout=f, stderr=subprocess.STDOUT, env=env(),
                                start_new_session=True)
    return Proc(name, proc, log)


def _merge(a: dict, b: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in a.items()}
    for k, v in (b or {}).items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def _wait(p: Proc, pattern: re.Pattern, deadline: float) -> re.Match:
    while True:
        m = pattern.search(p.log())
        if m:
            return m
        if p.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{p.name} did not start (rc={p.proc.poll()}):\n{p.log()[-3000:]}")
        time.sleep(0.2)


def start_cluster(tmp: Path, n_prefill: int, n_decode: int, *, overrides: dict | None = None,
                  per_instance: dict[str, dict] | None = None, connector: str = "tcp",
                  timeout: float = 300.0) -> Cluster:
    """Instances first (all at once), then the router once they are up. ``per_instance`` maps
    ``prefill2`` / ``decode0`` to extra config for that instance only. ``connector="p2p"``: the
    instances join one gloo transfer group (prefill ranks first, as the launcher assigns them)."""
    tmp.mkdir(parents=True, exist_ok=True)
    base = _merge(BASE, overrides or {})
    per_instance = dict(per_instance or {})
    if connector == "p2p":
        base = _merge(base, {"disaggregation": {"kv_connector": "p2p", "transfer_group_address": f"127.0.0.1:{free_port()}",
                                                "transfer_group_size": n_prefill + n_decode}})
        for r, name in enumerate([f"prefill{i}" for i in range(n_prefill)] + [f"decode{i}" for i in range(n_decode)]):
            per_instance[name] = _merge(per_instance.get(name, {}), {"disaggregation": {"transfer_group_rank": r}})
    cl = Cluster([], [])
    try:
        for role, n, out in (("prefill", n_prefill, cl.prefill), ("decode", n_decode, cl.decode)):
            for i in range(n):
                name = f"{role}{i}"
                port = free_port()
                cfg = _merge(base, {"disaggregation": {"role": role}, "server": {"grpc_port": port, "http_port": -1}})
                cfg = _merge(cfg, per_instance.get(name, {}))
                p = _spawn(tmp, name, cfg)
                p.address = f"127.0.0.1:{port}"
                out.append(p)
        deadline = time.monotonic() + timeout
        for p in cl.prefill + cl.decode:
            _wait(p, INSTANCE_RE, deadline)
        rcfg = _merge(base, {"disaggregation": {
            "role": "router", "prefill_instances": ",".join(p.address for p in cl.prefill),
            "decode_instances": ",".join(p.address for p in cl.decode)}})
        cl.router = _spawn(tmp, "router", rcfg)
        m = _wait(cl.router, ROUTER_RE, deadline)
        cl.router.address, cl.grpc_address = m.group(1), m.group(2)
    except BaseException:
        cl.stop()
        raise
    return cl


def stream_completion(url: str, prompt: str, **params: Any) -> tuple[str, list[dict]]:
    """POSTs a streaming /v1/completions; returns (concatenated text, the parsed events)."""
    import json

    import httpx

    events, text = [], ""
    body = {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "stream": True, **params}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            events.append(ev)
            for c in ev.get("choices", []):
                text += c.get("text") or ""
    return text, events
