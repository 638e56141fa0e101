# SPDX-License-Identifier: Apache-2.0
"""The mindie-llm CLI: argument parsing, delegation to the server, error exit codes, and the
benchmark table (oracle: the numbers fed in, and the floor formula batch * bandwidth / bytes)."""
import sys

import pytest

from mindie_llm import cli
from mindie_llm.bench.offline import Row, format_table


def test_parser_generate_and_chat_options():
    p = cli.build_parser()
    a = p.parse_args(["generate", "hi", "--max-tokens", "5", "--set", "cache.num_blocks=64", "--no-chat"])
    assert (a.prompt, a.max_tokens, a.overrides, a.no_chat, a.temperature) == ("hi", 5, ["cache.num_blocks=64"], True, 0.0)
    a = p.parse_args(["chat", "--system", "be brief", "--temperature", "0.7"])
    assert a.system == "be brief" and a.temperature == 0.7


def test_serve_delegates_with_raw_argv(monkeypatch, capsys):
    calls = []
    fake = type(sys)("mindie_llm.server.launcher")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "mindie_llm.server.launcher", fake)
    assert cli.main(["serve", "--config", "x.yaml"]) == 0
    assert calls == [["--config", "x.yaml"]]


def test_missing_server_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mindie_llm.bench.serve_client", None)
    assert cli.main(["bench", "serve"]) == 2
    assert "not available" in capsys.readouterr().err


def test_bad_config_is_one_line_error(capsys):
    assert cli.main(["generate", "hi", "--set", "cache.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "cache.no_such_key" in err and "Traceback" not in err


def test_bench_table_floor():
    rows = [Row("mindie-llm", "batch 1 decode", 40.0, 110_000_000, 11.0),
            Row("transformers", "batch 1 decode", 14.5, 540_000_000, 11.0),
            Row("mindie-llm", "16 x 128 aggregate", 300.0, 540_000_000, 11.0, 16)]
    assert rows[0].floor_tok_s == pytest.approx(100.0)
    assert rows[2].floor_tok_s == pytest.approx(16 * 11e9 / 540e6)
    t = format_table(rows)
    assert "| mindie-llm | batch 1 decode | 40.0 | 110 | 100.0 | 40% |" in t
    assert "batch 1 decode: mindie-llm / transformers = 2.76x" in t


def test_bench_prints_progress_and_partial_rows_on_ctrl_c(monkeypatch, capsys):
    """Ctrl-C during the offline benchmark prints the rows measured so far and exits 130."""
    import argparse

    from mindie_llm import cli
    from mindie_llm.bench import offline

    def fake_mindie(args, rows, total):
        offline._progress(1, total, "mindie-llm: loading the model")
        rows.append(Row("mindie-llm", "batch 1 decode", 10.0, 10 ** 6, 11.0))
        raise KeyboardInterrupt

    monkeypatch.setattr(offline, "_bench_mindie", fake_mindie)
    assert cli.main(["bench", "--no-hf"]) == 130
    out = capsys.readouterr()
    assert "[1/3] mindie-llm: loading the model" in out.err
    assert "interrupted" in out.out and "| mindie-llm | batch 1 decode | 10.0 |" in out.out
