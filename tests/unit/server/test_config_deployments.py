# SPDX-License-Identifier: Apache-2.0
"""The deployment files and their reference page.

Oracles: the config dataclasses themselves (every key and default must appear in
docs/configuration.md, so the page cannot drift from the code) and the launcher's own argument
handling (errors must name the key and the file).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from mindie_llm.config import _SECTIONS, ConfigError, EngineConfig
from mindie_llm.server.launcher import build_arg_parser, load_config

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "configuration.md"


def _default(f: dataclasses.Field) -> object:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _yaml_text(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def test_every_key_is_documented_with_its_default():
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| `([a-z_]+\.[a-z_]+)` \| `([^`]*)` \|", line)
        if m:
            rows[m.group(1)] = m.group(2)
    expected = {f"{s}.{f.name}": _yaml_text(_default(f)) for s, cls in _SECTIONS.items()
                for f in dataclasses.fields(cls)}
    missing = sorted(set(expected) - set(rows))
    assert not missing, f"undocumented keys: {missing}"
    extra = sorted(set(rows) - set(expected))
    assert not extra, f"documented keys that do not exist: {extra}"
    wrong = {k: (rows[k], v) for k, v in expected.items() if rows[k] != v}
    assert not wrong, f"documented default differs from the code: {wrong}"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_deployments_load(path):
    cfg = EngineConfig.from_yaml(str(path))
    assert cfg.server.host == "127.0.0.1", "deployments bind loopback unless the user says otherwise"


def test_default_deployment_serves_smollm2_on_cpu():
    cfg = EngineConfig.from_yaml(str(ROOT / "configs" / "default.yaml"))
    assert cfg.model.path is None and cfg.backend.device == "cpu"
    assert (cfg.server.http_port, cfg.server.grpc_port) == (8000, 8001)


def _args(*argv: str):
    return build_arg_parser().parse_args(list(argv))


@pytest.mark.parametrize("body,key", [
    ("scheduler:\n  max_batch_sise: 4\n", "scheduler.max_batch_sise"),
    ("schedular:\n  max_batch_size: 4\n", "schedular"),
    ("cache:\n  cache_block_size: 12\n", "cache.cache_block_size"),
    ("server:\n  http_port: eighty\n", "server.http_port"),
    ("server:\n  http_port: 70000\n", "server.http_port"),
    ("model:\n  dtype: float8\n", "model.dtype"),
    ("scheduler:\n  enable_chunked_prefill: 1\n", "scheduler.enable_chunked_prefill"),
    ("server:\n  tls_cert_file: a.pem\n", "server.tls_cert_file"),
    ("- just\n- a list\n", "<root>"),
    ("model: [unclosed\n", "<file>"),
])
def test_bad_yaml_names_the_key_and_the_file(tmp_path, body, key):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_config(_args("--config", str(p)))
    assert e.value.key == key and str(p) in str(e.value)


def test_overrides_and_shortcuts_apply(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("server:\n  http_port: 8000\n")
    cfg = load_config(_args("--config", str(p), "--set", "scheduler.max_batch_size=3", "--port", "0",
                            "--grpc-port", "-1", "--set", "cache.enable_prefix_caching=false"))
    assert cfg.scheduler.max_batch_size == 3 and cfg.server.http_port == 0 and cfg.server.grpc_port == -1
    assert cfg.cache.enable_prefix_caching is False
    with pytest.raises(ConfigError) as e:
        load_config(_args("--config", str(p), "--set", "server.nope=1"))
    assert e.value.key == "server.nope"
    with pytest.raises(ConfigError) as e:
        load_config(_args("--set", "scheduler.max_n=0"))
    assert e.value.key == "scheduler.max_n"
