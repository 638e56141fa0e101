# SPDX-License-Identifier: Apache-2.0
"""PD under load and faults, on one deployment whose instances are taken away test by test
(the tests run in file order): 3 prefill (prefill2 stalls every transfer past the timeout) and
2 decode instances behind a router, SmolLM2 on the CPU over loopback.

1. a stalled transfer fails on both sides and the request is re-run elsewhere (same output as a
   request that never met the stall: the oracle is the same prompt served without a retry);
2. prefill2 is killed while it runs prompts: its requests are retried, none fails;
3. 2 prefill + 2 decode under 200 concurrent requests: none lost;
4. a decode instance is killed mid-stream: that stream ends with an error naming the instance, the
   router keeps serving, and every surviving pool has all its blocks back (instance Stats and the
   router's /metrics)."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from pd_cluster import start_cluster, stream_completion

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cl = start_cluster(tmp_path_factory.mktemp("pdfaults"), 3, 2,
                       overrides={"disaggregation": {"transfer_timeout_s": 4.0}},
                       per_instance={"prefill2": {"disaggregation": {"test_stall_transfer_s": 2.0}}})
    yield cl
    cl.stop()


def _metric(text: str, prefix: str) -> float:
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(prefix))


def _assert_pools_clean(cl, procs):
    deadline = time.monotonic() + 10
    while True:
        stats = {p.name: cl.stats(p) for p in procs}
        clean = all(s.num_free_kv_blocks == s.num_kv_blocks - 1 and s.num_pinned_requests == 0
                    and s.num_pending_transfers == 0 for s in stats.values())
        if clean or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert clean, stats
    time.sleep(0.6)                                 # the router's view (two health polls)
    m = cl.metrics()
    for p in procs:
        s = stats[p.name]
        assert _metric(m, 'mindie_pd_instance_num_free_kv_blocks{instance="%s"' % p.address) == s.num_kv_blocks - 1


def test_stalled_transfer_fails_on_both_sides_and_is_retried(cluster):
    ref, _ = stream_completion(cluster.http_url, PROMPT, temperature=0.0, max_tokens=6)
    texts = [stream_completion(cluster.http_url, PROMPT, temperature=0.0, max_tokens=6)[0] for _ in range(3)]
    assert texts == [ref] * 3                        # round robin: one of them met prefill2's stall
    assert cluster.stats(cluster.prefill[2]).num_transfer_failures >= 1
    m = cluster.metrics()
    assert _metric(m, 'mindie_pd_events_total{kind="retry",phase="transfer"}') >= 1
    _assert_pools_clean(cluster, cluster.prefill + cluster.decode)


def test_kill_prefill_while_its_prompts_run(cluster):
    long_prompt = " ".join(f"word{i}" for i in range(100))
    results: list = []

    def one(i):
        try:
            text, events = stream_completion(cluster.http_url, f"{i} {long_prompt}", temperature=0.0, max_tokens=3)
            results.append(events[-1]["choices"][0]["finish_reason"])
        except Exception as e:  # noqa: BLE001
            results.append(repr(e))

    retries0 = _metric(cluster.metrics(), 'mindie_pd_events_total{kind="retry",phase="prefill"}')
    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    victim = cluster.prefill[2]
    deadline = time.monotonic() + 60
    while cluster.stats(victim).queued_prompt_tokens == 0:
        assert time.monotonic() < deadline, "prefill2 never received a prompt"
        time.sleep(0.02)
    victim.kill()
    for t in threads:
        t.join(120)
    assert results == ["length"] * 6, results
    assert _metric(cluster.metrics(), 'mindie_pd_events_total{kind="retry",phase="prefill"}') > retries0
    cluster.prefill.remove(victim)
    cluster.extra.append(victim)


def test_200_concurrent_requests_none_lost(cluster):
    assert len(cluster.prefill) == 2 and len(cluster.decode) == 2

    async def run():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=256)) as c:
            async def one(i):
                r = await c.post(f"{cluster.http_url}/v1/completions", json={
                    "model": "SmolLM2-135M-Instruct", "prompt": f"Request {i}: count to", "max_tokens": 4,
                    "temperature": 0.0 if i % 2 else 0.7, "seed": i})
                return r.status_code, r.json()
            return await asyncio.gather(*(one(i) for i in range(200)))

    before = cluster.metrics()
    t0 = time.monotonic()
    out = asyncio.run(run())
    elapsed = time.monotonic() - t0
    bad = [(s, b) for s, b in out if s != 200 or b["choices"][0]["finish_reason"] not in ("length", "stop")]
    assert not bad, (len(bad), bad[:3])
    assert all(b["usage"]["completion_tokens"] >= 1 for _, b in out)
    after = cluster.metrics()
    for d in cluster.decode:                        # both decode instances took part
        key = 'mindie_pd_phase_seconds_count{instance="%s",phase="decode"}' % d.address
        assert _metric(after, key) > _metric(before, key)
    print(f"200 concurrent requests in {elapsed:.1f}s")
    _assert_pools_clean(cluster, cluster.prefill + cluster.decode)


def test_kill_decode_mid_stream(cluster):
    body = {"model": "SmolLM2-135M-Instruct", "prompt": PROMPT, "stream": True, "max_tokens": 200,
            "temperature": 0.0, "ignore_eos": True}
    events, error = [], None
    victim = None
    with httpx.stream("POST", f"{cluster.http_url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                error = ev["error"]
                break
            events.append(ev)
            if len(events) == 4 and victim is None:
                victim = next(d for d in cluster.decode if cluster.stats(d).num_running > 0)
                victim.kill()
    assert victim is not None and error is not None, events[-2:]
    assert victim.address in error["message"] and "decode instance" in error["message"]
    cluster.decode.remove(victim)
    cluster.extra.append(victim)
    # the router keeps serving (a request may meet the dead instance before the health check
    # does: it is retried on the survivor before any decode token)
    for _ in range(3):
        text, ev = stream_completion(cluster.http_url, PROMPT, temperature=0.0, max_tokens=4)
        assert text and ev[-1]["choices"][0]["finish_reason"] == "length"
    time.sleep(0.6)
    assert 'mindie_pd_instance_up{instance="%s",role="decode"} 0.0' % victim.address in cluster.metrics()
    _assert_pools_clean(cluster, cluster.prefill + cluster.decode)
