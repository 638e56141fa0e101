# SPDX-License-Identifier: Apache-2.0
"""Helpers of the server tests: start a real ``mindie-llm serve`` process on free loopback ports.

Test modules import these by this module's unique name (``from server_harness import ...``);
the fixtures built on them are in conftest.py.

    def test_x(server_factory):
        srv = server_factory({"scheduler": {"max_queued_requests": 8}})   # merged over BASE_CONFIG
        httpx.get(srv.http_url + "/health"); grpc.insecure_channel(srv.grpc_address)

``server_factory`` is module-scoped: start one server per module (or per distinct config) and share
it; every server it started is stopped (SIGTERM, then SIGKILL) when the module ends.
``start_server(tmp_dir, config)`` is the same without the fixture. Ports are 0 in the YAML, and the
real ones are read from the ready line the launcher prints.
"""
from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_PYTHON = Path(__file__).resolve().parents[3] / "python"
READY_RE = re.compile(r"mindie-llm ready: http=(\S+) grpc=(\S+) model=(\S+) max_model_len=(\d+)")

# Small and fast: the embedded SmolLM2 on the CPU with a short context.
BASE_CONFIG: dict[str, Any] = {
    "model": {"dtype": "float32", "max_seq_len": 512, "served_model_name": "SmolLM2-135M-Instruct"},
    "cache": {"cache_block_size": 16, "num_blocks": 512},
    "scheduler": {"max_batch_size": 64, "max_prefill_tokens": 1024, "max_queued_requests": 256, "max_n": 8},
    "backend": {"device": "cpu"},
    "server": {"host": "127.0.0.1", "http_port": 0, "grpc_port": 0, "max_tokens_limit": 256,
               "drain_timeout_s": 30.0},
}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_PYTHON), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TQDM_DISABLE"] = "1"
    env.pop("MINDIE_API_KEY", None)
    env.update(extra or {})
    return env


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    config_path: Path
    log_path: Path
    http_url: str | None = None        # "http://127.0.0.1:PORT" (https with TLS), None if HTTP is off
    grpc_address: str | None = None    # "127.0.0.1:PORT", None if gRPC is off
    model: str = ""
    max_model_len: int = 0
    api_key: str | None = None
    _stopped: bool = field(default=False, repr=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metrics_text(self) -> str:
        import httpx

        r = httpx.get(f"{self.http_url}/metrics", headers=self.headers(), timeout=30, verify=False)
        r.raise_for_status()
        return r.text

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of ``/metrics`` (labels given must all match)."""
        return metric_value(self.metrics_text(), name, **labels)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signals the server and waits; SIGKILL if it does not exit within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._stopped = True
        return self.proc.returncode


def metric_value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    raise KeyError(f"metric {name}{labels} not in /metrics")


FAKE_SERVER = Path(__file__).resolve().parent / "fake_server.py"


def launch(tmp_dir: Path, config: dict[str, Any] | str, *, args: list[str] | None = None,
           env: dict[str, str] | None = None, fake_step_delay: float | None = None
           ) -> tuple[subprocess.Popen, Path, Path]:
    """Starts ``python -m mindie_llm.server.launcher --config <tmp>/server.yaml`` without waiting
    (``fake_step_delay`` set: the same launcher over the fake engine of fake_server.py)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    n = len(list(tmp_dir.glob("server-*.yaml")))
    cfg_path = tmp_dir / f"server-{n}.yaml"
    cfg_path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    log_path = tmp_dir / f"server-{n}.log"
    with open(log_path, "wb") as log:
        entry = (["-m", "mindie_llm.server.launcher"] if fake_step_delay is None else
                 [str(FAKE_SERVER), "--step-delay", str(fake_step_delay)])
        proc = subprocess.Popen([sys.executable, *entry, "--config", str(cfg_path), *(args or [])],
                                stdout=log, stderr=subprocess.STDOUT, env=server_env(env), start_new_session=True)
    return proc, cfg_path, log_path


def start_server(tmp_dir: Path, overrides: dict[str, Any] | None = None, *, env: dict[str, str] | None = None,
                 timeout: float = 240.0, fake_step_delay: float | None = None) -> ServerProcess:
    """Starts a server from ``BASE_CONFIG`` merged with ``overrides`` and waits for its ready line
    (``fake_step_delay``: over the fake engine, see fake_server.py; the model is "fake-model")."""
    config = merge(BASE_CONFIG, overrides or {})
    proc, cfg_path, log_path = launch(tmp_dir, config, env=env, fake_step_delay=fake_step_delay)
    srv = ServerProcess(proc, cfg_path, log_path, api_key=config["server"].get("api_key") or
                        (env or {}).get(config["server"].get("api_key_env", "MINDIE_API_KEY")))
    deadline = time.monotonic() + timeout
    while True:
        m = READY_RE.search(srv.log())
        if m:
            srv.http_url = None if m.group(1) == "off" else m.group(1)
            srv.grpc_address = None if m.group(2) == "off" else m.group(2)
            srv.model, srv.max_model_len = m.group(3), int(m.group(4))
            return srv
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before ready:\n{srv.log()[-3000:]}")
        if time.monotonic() > deadline:
            srv.stop(signal.SIGKILL)
            raise RuntimeError(f"server not ready after {timeout}s:\n{srv.log()[-3000:]}")
        time.sleep(0.1)


SHARED_OVERRIDES: dict[str, Any] = {"server": {"grpc_port": -1}, "scheduler": {"max_queued_requests": 1024}}
