# SPDX-License-Identifier: Apache-2.0
"""``mindie-llm bench serve`` (bench/serve_client.py): a smoke run over gRPC against a server
process (the fake-engine server of tests/unit/server/test_grpc_server.py, so it takes seconds),
checking the printed table, requests.csv, summary.json and plot.png; and the statistics against
numpy's percentiles (the oracle).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mindie_llm.bench import serve_client as bench_client
from mindie_llm.bench.serve_client import RequestResult, add_arguments, summarize

pytestmark = pytest.mark.timeout(120)

_FAKE_SERVER = Path(__file__).resolve().parents[2] / "unit" / "server" / "test_grpc_server.py"


def _args(*argv: str) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser()).parse_args(list(argv))


@pytest.fixture(scope="module")
def fake_ports():
    """(grpc port, http port) of a fake-engine server process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen([sys.executable, str(_FAKE_SERVER), "--step-delay", "0.002", "--http"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    http_line, grpc_line = proc.stdout.readline(), proc.stdout.readline()
    if not (http_line.startswith("HTTP_PORT ") and grpc_line.startswith("PORT ")):
        proc.kill()
        pytest.fail("fake server did not start: " + proc.stderr.read()[-2000:])
    yield int(grpc_line.split()[1]), int(http_line.split()[1])
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def fake_grpc_port(fake_ports):
    return fake_ports[0]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bench_serve_writes_csv_json_and_png(fake_ports, protocol, tmp_path, capsys):
    out = tmp_path / "bench"
    port = fake_ports[0] if protocol == "grpc" else fake_ports[1]
    code = bench_client.main(_args("--protocol", protocol, "--port", str(port), "--num-requests", "12",
                                   "--request-rate", "200", "--input-len", "8", "--output-len", "5",
                                   "--out", str(out)))
    assert code == 0
    printed = capsys.readouterr().out
    for words in ("Successful requests", "Median TTFT (ms)", "P99 TPOT (ms)", "P90 ITL (ms)",
                  "Output token throughput"):
        assert words in printed
    rows = list(csv.DictReader(open(out / "requests.csv", encoding="utf-8")))
    assert len(rows) == 12 and all(r["success"] == "1" for r in rows)
    assert all(int(r["output_tokens"]) == 5 for r in rows)   # the fake engine never stops early
    assert all(float(r["ttft_ms"]) <= float(r["e2e_latency_ms"]) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == 12 and summary["total_output_tokens"] == 60
    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_bench_serve_with_a_jsonl_dataset(fake_grpc_port, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p}) for p in ("abc", "xyz")) + "\n")
    args = _args("--protocol", "grpc", "--port", str(fake_grpc_port), "--dataset", str(data), "--num-requests", "5",
                 "--output-len", "3")
    results, _, _ = bench_client.run_benchmark(args)
    # Prompts cycle through the file: the fake engine sees 3 prompt tokens each time.
    assert [r.prompt_tokens for r in results] == [3] * 5 and all(r.output_tokens == 3 for r in results)


def test_bench_serve_reports_failures_explicitly(tmp_path, capsys):
    # Nothing listens on this port: one line says so (no table of failed requests).
    code = bench_client.main(_args("--protocol", "grpc", "--port", "1", "--model", "m", "--num-requests", "3",
                                   "--timeout", "5"))
    assert code == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no server at 127.0.0.1:1" in out[0]


@pytest.mark.parametrize("argv", [("--num-requests", "0"), ("--output-len", "0"), ("--request-rate", "0"),
                                  ("--max-concurrency", "0")])
def test_bench_serve_rejects_bad_arguments(argv, capsys):
    assert bench_client.main(_args(*argv)) == 2
    assert argv[0] in capsys.readouterr().out


def test_summary_percentiles_match_numpy():
    rng = np.random.default_rng(0)
    results = []
    for i in range(200):
        ttft = float(rng.uniform(0.01, 0.5))
        itls = [float(x) for x in rng.uniform(0.001, 0.05, size=9)]
        results.append(RequestResult(index=i, start=i * 0.01, success=True, prompt_tokens=10, output_tokens=10,
                                     ttft=ttft, latency=ttft + sum(itls), itls=itls))
    results.append(RequestResult(index=200, error="RESOURCE_EXHAUSTED: queue full"))
    s = summarize(results, duration=4.0)
    assert s["completed"] == 200 and s["failed"] == 1 and s["errors"] == {"RESOURCE_EXHAUSTED": 1}
    ttft_ms = [r.ttft * 1000 for r in results[:200]]
    itl_ms = [x * 1000 for r in results[:200] for x in r.itls]
    tpot_ms = [(r.latency - r.ttft) / 9 * 1000 for r in results[:200]]
    for q in (50, 90, 99):
        assert math.isclose(s[f"p{q}_ttft_ms"], np.percentile(ttft_ms, q), rel_tol=1e-9)
        assert math.isclose(s[f"p{q}_itl_ms"], np.percentile(itl_ms, q), rel_tol=1e-9)
        assert math.isclose(s[f"p{q}_tpot_ms"], np.percentile(tpot_ms, q), rel_tol=1e-9)
    assert math.isclose(s["output_throughput"], 2000 / 4.0)
    assert math.isclose(s["mean_e2el_ms"], np.mean([r.latency * 1000 for r in results[:200]]))


def test_cli_entry_takes_a_command_line(fake_grpc_port, capsys):
    from mindie_llm.cli import main as cli_main

    assert cli_main(["bench", "serve", "--protocol", "grpc", "--port", str(fake_grpc_port),
                     "--num-requests", "3", "--output-len", "2", "--input-len", "4"]) == 0
    assert "Successful requests" in capsys.readouterr().out
