# SPDX-License-Identifier: Apache-2.0
"""`mindie-llm serve MODEL` with vLLM's flag names: each flag maps to its YAML key (the table in
docs/configuration.md is the oracle, and is checked against the code both ways), and the served
model name follows vLLM's rule (the model argument as given, unless one is set)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from mindie_llm.config import ConfigError
from mindie_llm.server.launcher import VLLM_FLAGS, build_arg_parser, load_config

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"
VALUES = {int: "2", float: "0.5", str: None}
STR_VALUES = {"--dtype": ("half", "float16"), "--quantization": ("int8", "int8"), "--device": ("cpu", "cpu"),
              "--served-model-name": ("my-model", "my-model"), "--api-key": ("123", "123"),
              "--tokenizer": ("/tok", "/tok")}


def _cfg(*argv: str):
    return load_config(build_arg_parser().parse_args(list(argv)))


def _get(cfg, key: str):
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def test_the_doc_table_matches_the_code():
    rows = dict(re.findall(r"^\| `(--[a-z-]+)`[^|]*\| `([a-z_]+\.[a-z_]+)`", DOC.read_text(), re.M))
    assert {f: k for f, (k, _) in VLLM_FLAGS.items()}.items() <= rows.items()
    assert {"--host": "server.host", "--port": "server.http_port"}.items() <= rows.items()


@pytest.mark.parametrize("flag", sorted(VLLM_FLAGS))
def test_each_flag_sets_its_key(flag):
    key, typ = VLLM_FLAGS[flag]
    if typ is bool:
        assert _get(_cfg(f"--no-{flag[2:]}"), key) is False
        assert _get(_cfg(flag), key) is True
        return
    given, expected = STR_VALUES.get(flag) or (VALUES[typ], typ(VALUES[typ]))
    if flag == "--block-size":
        given, expected = "32", 32
    if flag == "--tensor-parallel-size":
        given, expected = "1", 1
    assert _get(_cfg(flag, given), key) == expected


def test_positional_model_is_the_served_name_unless_one_is_set(tmp_path):
    cfg = _cfg("/models/Qwen2-0.5B")
    assert cfg.model.path == "/models/Qwen2-0.5B" and cfg.model.served_model_name == "/models/Qwen2-0.5B"
    assert _cfg("/m", "--served-model-name", "q").model.served_model_name == "q"
    y = tmp_path / "d.yaml"
    y.write_text("model: {served_model_name: from-yaml}\n")
    assert _cfg("/m", "--config", str(y)).model.served_model_name == "from-yaml"
    assert _cfg().model.served_model_name is None   # the embedded default keeps its own name


def test_flags_override_yaml_and_bad_values_name_the_key(tmp_path):
    y = tmp_path / "d.yaml"
    y.write_text("scheduler: {max_batch_size: 8}\n")
    assert _cfg("--config", str(y), "--max-num-seqs", "4").scheduler.max_batch_size == 4
    with pytest.raises(ConfigError, match="model.dtype"):
        _cfg("--dtype", "int3")
    with pytest.raises(ConfigError, match="model.path"):
        _cfg("/a", "--model", "/b")
