# SPDX-License-Identifier: Apache-2.0
"""500 concurrent HTTP requests (half streaming): none is lost, each gets a result or an explicit
error. Latency and throughput are printed (run with ``-s``) for docs/performance.md; nothing here
asserts a time.

Oracle: the request count itself (every request accounted for) and each result's token count.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

M = "SmolLM2-135M-Instruct"
N = 500
MAX_TOKENS = 4


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] if xs else float("nan")


def test_500_concurrent_requests_none_lost(shared_server):
    srv = shared_server  # queue of 1024, batch of 64: every request is admitted
    done_before = srv.metric("mindie_requests_total", outcome="length") if \
        'outcome="length"' in srv.metrics_text() else 0.0

    async def one(c: httpx.AsyncClient, i: int):
        body = {"model": M, "prompt": f"Request number {i} says", "max_tokens": MAX_TOKENS,
                "ignore_eos": True, "temperature": 0}
        t0 = time.perf_counter()
        try:
            if i % 2:
                ttft = None
                tokens = 0
                async with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
                    if r.status_code != 200:
                        return "error", r.status_code, None, time.perf_counter() - t0
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            ttft = ttft or time.perf_counter() - t0
                            tokens += bool(json.loads(line[6:])["choices"][0]["text"])
                return "ok", tokens, ttft, time.perf_counter() - t0
            r = await c.post("/v1/completions", json=body)
            if r.status_code != 200:
                return "error", r.status_code, None, time.perf_counter() - t0
            return "ok", r.json()["usage"]["completion_tokens"], None, time.perf_counter() - t0
        except httpx.HTTPError as e:  # an explicit transport error still counts as "not lost"
            return "transport", type(e).__name__, None, time.perf_counter() - t0

    async def main():
        async with httpx.AsyncClient(base_url=srv.http_url, timeout=600,
                                     limits=httpx.Limits(max_connections=N + 10)) as c:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(one(c, i) for i in range(N)))
            return results, time.perf_counter() - t0

    results, wall = asyncio.run(main())
    assert len(results) == N
    ok = [r for r in results if r[0] == "ok"]
    errors = [r for r in results if r[0] != "ok"]
    # Nothing lost: every request answered; with a queue of 1024 none should even be refused.
    assert not errors, errors[:5]
    assert all(r[1] >= 1 for r in ok)
    assert all(r[1] == MAX_TOKENS for r in ok if r[2] is None)
    e2e = [r[3] for r in ok]
    ttft = [r[2] for r in ok if r[2] is not None]
    gen = sum(r[1] for r in ok)
    print(f"\n[load_http] {N} requests, {MAX_TOKENS} tokens each, wall {wall:.1f}s, "
          f"{N / wall:.1f} req/s, {gen / wall:.1f} generated tok/s; e2e p50 {_pct(e2e, 50):.2f}s "
          f"p90 {_pct(e2e, 90):.2f}s p99 {_pct(e2e, 99):.2f}s; stream TTFT p50 {_pct(ttft, 50):.2f}s "
          f"p99 {_pct(ttft, 99):.2f}s (mean e2e {statistics.mean(e2e):.2f}s)")
    assert srv.metric("mindie_requests_total", outcome="length") >= done_before + N
    assert httpx.get(f"{srv.http_url}/health").status_code == 200
