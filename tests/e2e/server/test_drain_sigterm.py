# SPDX-License-Identifier: Apache-2.0
"""Drain on SIGTERM: /ready turns 503, new requests get 503, the in-flight stream finishes whole,
the process exits 0 and leaves nothing behind.

Oracle: the same request's text from the server before the drain (greedy, so identical).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

M = "SmolLM2-135M-Instruct"


def test_sigterm_drains_in_flight_requests_then_exits_0(server_factory):
    srv = server_factory({"server": {"grpc_port": -1, "drain_timeout_s": 60.0}})
    body = {"model": M, "prompt": "Write a long story about a dragon.", "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}
    expected = httpx.post(f"{srv.http_url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]

    got: dict[str, object] = {}
    first_chunk = threading.Event()

    def stream() -> None:
        text, finish = "", None
        with httpx.stream("POST", f"{srv.http_url}/v1/completions", json=body | {"stream": True},
                          timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                finish = choice["finish_reason"] or finish
                first_chunk.set()
        got.update(text=text, finish=finish)

    t = threading.Thread(target=stream)
    t.start()
    assert first_chunk.wait(60)
    srv.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while httpx.get(f"{srv.http_url}/ready", timeout=10).status_code != 503:
        assert time.monotonic() < deadline, "/ready never turned 503"
        time.sleep(0.02)
    late = httpx.post(f"{srv.http_url}/v1/completions", json=body | {"max_tokens": 2}, timeout=30)
    assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
    t.join(120)
    assert got == {"text": expected, "finish": "length"}
    assert srv.proc.wait(60) == 0
    with pytest.raises(ProcessLookupError):
        os.killpg(srv.proc.pid, 0)
    assert "mindie-llm stopped" in srv.log()


@pytest.mark.parametrize("how", ["drain-timeout", "second-signal"])
def test_drain_end_aborts_what_is_left_and_still_exits_0(server_factory, how):
    # Either the drain timeout runs out, or a second signal (Ctrl-C twice) stops the wait early.
    srv = server_factory({"server": {"grpc_port": -1, "drain_timeout_s": 0.5 if how == "drain-timeout" else 600.0}})
    body = {"model": M, "prompt": "Count to one thousand:", "max_tokens": 256, "temperature": 0,
            "ignore_eos": True, "stream": True}
    started = threading.Event()
    ended: dict[str, object] = {}

    def stream() -> None:
        n = 0
        try:
            with httpx.stream("POST", f"{srv.http_url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        n += 1
                        started.set()
        except httpx.HTTPError as e:
            ended["error"] = type(e).__name__
        ended["chunks"] = n

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60)
    srv.proc.send_signal(signal.SIGTERM)
    if how == "second-signal":
        while "draining" not in srv.log():
            time.sleep(0.05)
        srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(60) == 0  # a hang guard, far below the 600 s drain timeout
    t.join(60)
    assert not t.is_alive() and ended["chunks"] < 256
