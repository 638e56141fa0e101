# SPDX-License-Identifier: Apache-2.0
"""Start-up failures of ``mindie-llm serve``: a clear one-line error naming the key (and file), a
non-zero exit code, and no process left behind.

Oracle: the launcher's documented exit codes (docs/configuration.md) and the config key at fault.
"""
from __future__ import annotations

import os
import socket

import pytest
import yaml
from server_harness import BASE_CONFIG, launch, merge

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _run(tmp_path, config, timeout: float = 240.0):
    proc, cfg_path, log_path = launch(tmp_path, config)
    rc = proc.wait(timeout)
    out = log_path.read_text(errors="replace")
    # start_new_session=True: the server led its own process group; nothing of it may remain.
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
    return rc, out, cfg_path


def _error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("mindie-llm:")]


@pytest.mark.parametrize("body,key", [
    ("scheduler:\n  max_batch_sise: 4\n", "scheduler.max_batch_sise"),
    ("cache:\n  cache_block_size: 3\n", "cache.cache_block_size"),
    ("server:\n  grpc_port: [1]\n", "server.grpc_port"),
    ("model: {dtype: float8}\n", "model.dtype"),
    ("server:\n  http_port: 0\n  bogus: [\n", "<file>"),
])
def test_bad_yaml_exits_2_naming_key_and_file(tmp_path, body, key):
    rc, out, cfg_path = _run(tmp_path, body)
    assert rc == 2, out
    lines = _error_lines(out)
    assert len(lines) == 1 and key in lines[0] and str(cfg_path) in lines[0], out
    assert "Traceback" not in out


def test_missing_model_exits_4(tmp_path):
    cfg = merge(BASE_CONFIG, {"model": {"path": str(tmp_path / "no-such-model.gguf")}})
    rc, out, _ = _run(tmp_path, cfg)
    assert rc == 4, out
    lines = _error_lines(out)
    assert len(lines) == 1 and "model" in lines[0] and "Traceback" not in out


@pytest.mark.parametrize("which", ["http_port", "grpc_port"])
def test_port_in_use_exits_3_before_loading_the_model(tmp_path, which):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cfg = merge(BASE_CONFIG, {"server": {which: port}})
        rc, out, _ = _run(tmp_path, cfg, timeout=60)
    assert rc == 3, out
    lines = _error_lines(out)
    assert len(lines) == 1 and f"server.{which}" in lines[0] and str(port) in lines[0], out


def test_unreadable_tls_file_exits_2(tmp_path):
    cfg = merge(BASE_CONFIG, {"server": {"tls_cert_file": str(tmp_path / "c.pem"),
                                         "tls_key_file": str(tmp_path / "k.pem")}})
    rc, out, _ = _run(tmp_path, yaml.safe_dump(cfg), timeout=60)
    assert rc == 2, out
    assert "server.tls_cert_file" in _error_lines(out)[0]
