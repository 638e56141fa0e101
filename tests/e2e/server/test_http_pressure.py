# SPDX-License-Identifier: Apache-2.0
"""The HTTP server under pressure: client disconnects, a burst over a small queue, a KV pool too
small for the load.

Oracles: the server's own /metrics before the load (free KV blocks baseline), the admission
contract (429 before any stream byte, admitted requests complete), and an unpressured server's
greedy outputs for the same prompts.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

M = "SmolLM2-135M-Instruct"
PROMPTS = [f"Fact {i}: the number {i * 7} is" for i in range(32)]  # < 16 tokens: no full prompt block


async def _wait_metric(srv, name: str, target: float, timeout: float = 60.0) -> float:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        v = srv.metric(name)
        if v == target or loop.time() > deadline:
            return v
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def roomy(shared_server):
    return shared_server


def test_64_cancelled_streams_return_their_kv_blocks(roomy):
    async def main():
        async with httpx.AsyncClient(base_url=roomy.http_url, timeout=120,
                                     limits=httpx.Limits(max_connections=100)) as c:
            r = await c.post("/v1/completions", json={"model": M, "prompt": "warm up", "max_tokens": 2})
            assert r.status_code == 200
            baseline = roomy.metric("mindie_kv_blocks_free")
            body = {"model": M, "max_tokens": 200, "ignore_eos": True, "stream": True, "temperature": 0}
            streams = [c.stream("POST", "/v1/completions", json=body | {"prompt": p}) for p in PROMPTS * 2]
            responses = await asyncio.gather(*(s.__aenter__() for s in streams))
            assert all(r.status_code == 200 for r in responses)
            lines = [r.aiter_lines() for r in responses]
            for it in lines:  # every stream has produced tokens
                while not (await it.__anext__()).startswith("data: {"):
                    pass
            assert roomy.metric("mindie_num_requests_running") > 0
            assert roomy.metric("mindie_kv_blocks_free") < baseline
            for s in streams:  # the clients go away mid-generation
                await s.__aexit__(None, None, None)
            assert await _wait_metric(roomy, "mindie_num_requests_running", 0) == 0
            assert await _wait_metric(roomy, "mindie_kv_blocks_free", baseline) == baseline
            assert roomy.metric("mindie_requests_total", outcome="cancelled") >= 64
            r = await c.post("/v1/completions", json={"model": M, "prompt": "canary", "max_tokens": 2})
            assert r.status_code == 200

    asyncio.run(main())


def test_burst_of_200_over_a_queue_of_8_gets_429_and_admitted_complete(server_factory):
    srv = server_factory({"server": {"grpc_port": -1},
                          "scheduler": {"max_queued_requests": 8, "max_batch_size": 4}})

    async def one(c: httpx.AsyncClient, i: int):
        body = {"model": M, "prompt": f"Burst {i}", "max_tokens": 4, "ignore_eos": True, "temperature": 0}
        if i % 2:
            async with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
                if r.status_code != 200:  # refused before the stream started: a plain JSON error
                    return r.status_code, json.loads(await r.aread())
                text = [json.loads(line[6:]) for line in [ln async for ln in r.aiter_lines()]
                        if line.startswith("data: {")]
                return 200, {"tokens": sum(len(e["choices"][0]["text"]) > 0 for e in text), "events": text}
        r = await c.post("/v1/completions", json=body)
        return r.status_code, r.json()

    async def main():
        async with httpx.AsyncClient(base_url=srv.http_url, timeout=300,
                                     limits=httpx.Limits(max_connections=250)) as c:
            return await asyncio.gather(*(one(c, i) for i in range(200)))

    results = asyncio.run(main())
    codes = [code for code, _ in results]
    assert set(codes) <= {200, 429}, sorted(set(codes))
    assert codes.count(429) > 0 and codes.count(200) >= 8
    for code, body in results:
        if code == 429:
            assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "rate_limit_error"
        elif "usage" in body:
            assert body["usage"]["completion_tokens"] == 4 and body["choices"][0]["finish_reason"] == "length"
        else:
            assert body["events"][-1]["choices"][0]["finish_reason"] == "length"
    assert srv.metric("mindie_requests_total", outcome="rejected_queue_full") == codes.count(429)
    assert httpx.get(f"{srv.http_url}/health").status_code == 200
    r = httpx.post(f"{srv.http_url}/v1/completions", json={"model": M, "prompt": "canary", "max_tokens": 2})
    assert r.status_code == 200
    srv.stop()


def _greedy_all(srv, max_tokens: int) -> list[str]:
    async def main():
        async with httpx.AsyncClient(base_url=srv.http_url, timeout=600,
                                     limits=httpx.Limits(max_connections=64)) as c:
            rs = await asyncio.gather(*(c.post("/v1/completions", json={
                "model": M, "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
                for p in PROMPTS))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200][:3]
        return [r.json()["choices"][0]["text"] for r in rs]

    return asyncio.run(main())


def test_kv_exhaustion_preempts_and_outputs_equal_an_unpressured_run(server_factory, roomy):
    # 32 requests x (< 16 prompt + 24 new tokens) need 2-3 blocks each (~90 in all); the pool has 24.
    tiny = server_factory({"server": {"grpc_port": -1}, "cache": {"num_blocks": 24},
                           "scheduler": {"max_batch_size": 32}})
    baseline = tiny.metric("mindie_kv_blocks_free")
    pressured = _greedy_all(tiny, 24)
    assert tiny.metric("mindie_num_preemptions_total") > 0
    assert asyncio.run(_wait_metric(tiny, "mindie_kv_blocks_free", baseline)) == baseline
    tiny.stop()
    assert pressured == _greedy_all(roomy, 24)
