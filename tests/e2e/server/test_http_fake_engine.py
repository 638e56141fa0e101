# SPDX-License-Identifier: Apache-2.0
"""Fast tests of AsyncLLM and the HTTP app over a deterministic stand-in for ``LLMEngine``.

The fake implements the engine API the servers use (validate/add/abort/step/stats) over a trivial "model":
prompt tokens are character codes, each step appends ``(last + 1) % 26 + 97`` to every running
request, text is those characters. It is also the oracle of those tests: the expected text of a
request is computable by hand (see :func:`expected_text`). KV accounting is exact: each running
request holds ``ceil(len / block_size)`` blocks, returned on finish or abort.

No model is loaded, so these run in seconds; the real-model tests live in the other test_http_* files.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

from mindie_llm.outputs import CompletionOutput, EngineStats, Logprob, RequestMetrics, RequestOutput
from mindie_llm.sampling_params import SamplingParams


class CharTokenizer:
    eos_token_id = 0
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 256 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        out = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return out + ("<assistant>" if add_generation_prompt else "")


def next_token(last: int) -> int:
    return (last + 1) % 26 + 97


def expected_text(prompt: str, max_tokens: int) -> str:
    last = ord(prompt[-1]) % 256
    out = []
    for _ in range(max_tokens):
        last = next_token(last)
        out.append(chr(last))
    return "".join(out)


@dataclass
class _Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    samples: list[list[int]] = field(default_factory=list)
    running: bool = False


class FakeEngine:
    """Single-threaded like the real one. ``gate`` (a threading.Event) can hang ``step()``;
    ``paused`` makes steps schedule nothing (requests stay waiting)."""

    def __init__(self, *, max_model_len: int = 256, block_size: int = 4, num_kv_blocks: int = 1024,
                 max_batch_size: int = 64, step_delay_s: float = 0.0, max_n: int = 16) -> None:
        self.tokenizer = CharTokenizer()
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.max_batch_size = max_batch_size
        self.max_n = max_n
        self.step_delay_s = step_delay_s
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next_step = False
        self.paused = False
        self.num_steps = 0
        self.abort_steps: dict[str, int] = {}  # request id -> num_steps when its abort arrived
        self.reqs: dict[str, _Req] = {}
        self.aborted: list[str] = []
        self.thread_ids: set[int] = set()
        self.stats = EngineStats(num_kv_blocks=num_kv_blocks, num_free_kv_blocks=num_kv_blocks - 1)

    def _blocks(self, r: _Req) -> int:
        return sum(math.ceil((len(r.prompt_ids) + len(s)) / self.block_size) for s in r.samples)

    def validate_request(self, prompt, params: SamplingParams) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt: must not be empty")
        if any(not 0 <= i < 256 for i in ids):
            raise ValueError("prompt: token id outside the vocabulary")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens: prompt + max_tokens exceeds max_model_len ({self.max_model_len})")
        if params.n > self.max_n:
            raise ValueError(f"n: must be <= {self.max_n}")
        return ids

    def add_request(self, request_id: str, prompt, params: SamplingParams, *, arrival_time=None, priority=0) -> None:
        self.thread_ids.add(threading.get_ident())
        ids = self.validate_request(prompt, params)
        if request_id in self.reqs:
            raise ValueError("request_id: duplicate")
        self.reqs[request_id] = _Req(request_id, ids, params, [[] for _ in range(params.n)])
        self.stats.num_waiting += params.n
        self.stats.num_prompt_tokens_total += len(ids)

    def _release(self, r: _Req) -> None:
        if r.running:
            self.stats.num_free_kv_blocks += self._blocks(r)
            self.stats.num_running -= len(r.samples)
        else:
            self.stats.num_waiting -= len(r.samples)

    def abort_request(self, request_id: str) -> None:
        self.thread_ids.add(threading.get_ident())
        r = self.reqs.pop(request_id, None)
        if r is not None:
            self.aborted.append(request_id)
            self.abort_steps[request_id] = self.num_steps
            self._release(r)

    def has_unfinished_requests(self) -> bool:
        return bool(self.reqs)

    def step(self) -> list[RequestOutput]:
        self.thread_ids.add(threading.get_ident())
        self.gate.wait()
        if self.fail_next_step:
            raise RuntimeError("injected device failure")
        if self.step_delay_s or self.paused:
            time.sleep(self.step_delay_s or 0.002)
        if self.paused:
            return []
        self.num_steps += 1
        outs = []
        for r in list(self.reqs.values()):
            if not r.running:
                if self.stats.num_running + len(r.samples) > self.max_batch_size:
                    continue
                r.running = True
                self.stats.num_waiting -= len(r.samples)
                self.stats.num_running += len(r.samples)
                self.stats.num_free_kv_blocks -= self._blocks(r)  # the prompt's blocks
            before = self._blocks(r)
            for s in r.samples:
                s.append(next_token(s[-1] if s else r.prompt_ids[-1]))
            self.stats.num_free_kv_blocks -= self._blocks(r) - before
            self.stats.num_generation_tokens_total += len(r.samples)
            done = len(r.samples[0]) >= r.params.max_tokens
            comps = []
            for i, s in enumerate(r.samples):
                lps = None
                if r.params.logprobs is not None:
                    lps = [{t: Logprob(-0.5, 1, chr(t))} | {65: Logprob(-3.0, 2, "A")} for t in s]
                comps.append(CompletionOutput(i, self.tokenizer.decode(s), list(s), -0.5 * len(s), lps,
                                              "length" if done else None))
            outs.append(RequestOutput(r.rid, None, list(r.prompt_ids), None, comps, done,
                                      RequestMetrics(arrival_time=time.time())))
            if done:
                del self.reqs[r.rid]
                self._release(r)
        self.stats.last_step_time = time.monotonic()
        return outs

    def get_stats(self) -> EngineStats:
        return EngineStats(**vars(self.stats))


# ---------------------------------------------------------------------------------------------
import asyncio
import json

import httpx
import pytest
from mindie_llm.config import EngineConfig
from mindie_llm.engine.async_llm import (
    AsyncLLM,
    EngineDeadError,
    EngineDrainingError,
    QueueFullError,
)
from mindie_llm.server.http.app import build_app

MODEL = "fake-model"
pytestmark = pytest.mark.timeout(60)


def make_llm(engine: FakeEngine | None = None, **server: object) -> tuple[AsyncLLM, FakeEngine]:
    engine = engine or FakeEngine()
    sched = {k: server.pop(k) for k in ("max_queued_requests", "max_n") if k in server}
    cfg = EngineConfig.from_dict({"server": dict(server), "scheduler": sched})
    return AsyncLLM(engine, cfg), engine


async def collect(llm: AsyncLLM, prompt, params: SamplingParams, rid: str) -> list[RequestOutput]:
    return [o async for o in llm.generate(prompt, params, rid)]


async def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_generate_streams_cumulative_outputs_from_the_engine_thread():
    async def main():
        llm, eng = make_llm()
        outs = await collect(llm, "hi", SamplingParams(max_tokens=5), "r1")
        await llm.shutdown()
        return outs, eng

    outs, eng = asyncio.run(main())
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 2, 3, 4, 5]
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert outs[-1].outputs[0].text == expected_text("hi", 5)
    assert threading.main_thread().ident not in eng.thread_ids and len(eng.thread_ids) == 1


def test_admission_errors_raise_before_anything_is_yielded():
    async def main():
        llm, eng = make_llm(max_queued_requests=4)
        with pytest.raises(ValueError, match="prompt"):
            await collect(llm, "", SamplingParams(max_tokens=2), "bad")
        eng.paused = True  # requests stay waiting
        gens = [llm.generate("a", SamplingParams(max_tokens=2), f"q{i}") for i in range(3)]
        tasks = [asyncio.ensure_future(g.__anext__()) for g in gens]
        await wait_for(lambda: eng.stats.num_waiting == 3)
        # n=2 would make 5 > 4 waiting: refused as a whole, nothing of it is added.
        with pytest.raises(QueueFullError):
            await collect(llm, "a", SamplingParams(max_tokens=2, n=2), "big")
        assert "big" not in eng.reqs and eng.stats.num_waiting == 3
        eng.paused = False
        firsts = await asyncio.gather(*tasks)
        assert all(f.outputs[0].text == expected_text("a", 1) for f in firsts)
        for g in gens:
            await g.aclose()
        await llm.shutdown()

    asyncio.run(main())


def test_leaving_a_stream_aborts_it_and_frees_its_blocks():
    async def main():
        llm, eng = make_llm(engine=FakeEngine(step_delay_s=0.005))
        baseline = eng.get_stats().num_free_kv_blocks
        gens = [llm.generate("xyz", SamplingParams(max_tokens=200), f"s{i}") for i in range(16)]
        for g in gens:
            await g.__anext__()
            await g.__anext__()
        assert eng.get_stats().num_free_kv_blocks < baseline
        closed_at = {}
        for i, g in enumerate(gens):
            closed_at[f"s{i}"] = eng.num_steps
            await g.aclose()
        await wait_for(lambda: len(eng.aborted) == 16 and not eng.reqs)
        # Each abort reached the engine before the step after the one running when it was closed.
        assert all(eng.abort_steps[rid] <= n + 1 for rid, n in closed_at.items()), (eng.abort_steps, closed_at)
        await wait_for(lambda: llm.get_stats().num_free_kv_blocks == baseline)
        await llm.shutdown()

    asyncio.run(main())


def test_drain_refuses_new_requests_and_waits_for_in_flight():
    async def main():
        llm, _ = make_llm(engine=FakeEngine(step_delay_s=0.002))
        task = asyncio.ensure_future(collect(llm, "a", SamplingParams(max_tokens=30), "inflight"))
        await wait_for(lambda: llm.num_active_requests == 1)
        llm.begin_drain()
        assert not llm.is_ready() and llm.is_live()
        with pytest.raises(EngineDrainingError):
            await collect(llm, "a", SamplingParams(max_tokens=2), "late")
        assert await llm.wait_drained(10.0)
        outs = await task
        assert outs[-1].finished and outs[-1].outputs[0].text == expected_text("a", 30)
        await llm.shutdown()

    asyncio.run(main())


def test_liveness_follows_engine_progress_not_the_event_loop():
    async def main():
        llm, eng = make_llm(health_stall_timeout_s=0.2)
        assert llm.is_live()
        eng.gate.clear()  # the engine hangs inside step()
        task = asyncio.ensure_future(collect(llm, "a", SamplingParams(max_tokens=2), "hang"))
        await wait_for(lambda: not llm.is_live(), timeout=5.0)
        assert not llm.is_ready()
        eng.gate.set()
        await task
        assert llm.is_live()
        eng.fail_next_step = True
        with pytest.raises(EngineDeadError):
            await collect(llm, "a", SamplingParams(max_tokens=2), "dies")
        assert not llm.is_live()
        with pytest.raises(EngineDeadError):
            await collect(llm, "a", SamplingParams(max_tokens=2), "after")
        await llm.shutdown()

    asyncio.run(main())


# --------------------------------------------------------------------------- HTTP app over the fake
async def _http(fn, engine: FakeEngine | None = None, **server: object):
    llm, eng = make_llm(engine, **server)
    app = build_app(llm, llm.config)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await fn(client, eng, llm)
    finally:
        await llm.shutdown()


def run_http(fn, engine: FakeEngine | None = None, **server: object):
    return asyncio.run(_http(fn, engine, **server))


def sse_events(text: str) -> list:
    events = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_http_completion_json_and_stream_agree_with_the_oracle():
    async def fn(client, eng, llm):
        body = {"model": MODEL, "prompt": "hey", "max_tokens": 6, "n": 2, "logprobs": 1}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        assert [c["text"] for c in data["choices"]] == [expected_text("hey", 6)] * 2
        assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}
        assert data["choices"][0]["finish_reason"] == "length"
        assert data["choices"][0]["logprobs"]["token_logprobs"] == [-0.5] * 6
        r = await client.post("/v1/completions", json=body | {"stream": True,
                                                               "stream_options": {"include_usage": True}})
        events = sse_events(r.text)
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 12
        texts = {0: "", 1: ""}
        for e in events[:-2]:
            for c in e["choices"]:
                texts[c["index"]] += c["text"]
        assert texts == {0: data["choices"][0]["text"], 1: data["choices"][1]["text"]}

    run_http(fn)


def test_http_chat_stream_has_role_then_deltas():
    async def fn(client, eng, llm):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "q"}], "max_tokens": 4}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        full = r.json()["choices"][0]["message"]["content"]
        assert full == expected_text("<assistant>", 4)
        r = await client.post("/v1/chat/completions", json=body | {"stream": True, "logprobs": True,
                                                                    "top_logprobs": 2})
        events = sse_events(r.text)[:-1]
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(e["choices"][0]["delta"]["content"] for e in events) == full
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        top = events[0]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        assert [t["token"] for t in top] == [full[0], "A"]

    run_http(fn)


BAD_REQUESTS = [
    ("completions", {"prompt": "x", "max_tokens": 2}, "model"),
    ("completions", {"model": MODEL, "max_tokens": 2}, "prompt"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": "2"}, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**30}, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": -1}, "temperature"),
    ("completions", {"model": MODEL, "prompt": "x", "n": 0}, "n"),
    ("completions", {"model": MODEL, "prompt": "x", "n": 17}, "n"),
    ("completions", {"model": MODEL, "prompt": "", "max_tokens": 2}, "prompt"),
    ("completions", {"model": MODEL, "prompt": "x", "logit_bias": {"x": 5}}, "logit_bias"),
    ("completions", {"model": MODEL, "prompt": "x", "logit_bias": {"1": 500}}, "logit_bias"),
    ("completions", {"model": MODEL, "prompt": "x", "bogus": 1}, "bogus"),
    ("completions", {"model": MODEL, "prompt": "x", "stop": ["s"] * 17}, "stop"),
    ("completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, "logprobs"),
    ("completions", {"model": MODEL, "prompt": [300], "max_tokens": 2}, "prompt[0]"),
    ("chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "pirate", "content": "x"}]}, "messages[0].role"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "top_logprobs"),
]


@pytest.mark.parametrize("route,body,param", BAD_REQUESTS)
def test_http_bad_request_names_the_field(route, body, param):
    async def fn(client, eng, llm):
        r = await client.post(f"/v1/{route}", json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and param.split(".")[0].split("[")[0] in err["message"]
        assert "Traceback" not in r.text

    run_http(fn)


def test_http_body_limit_auth_and_metrics():
    async def fn(client, eng, llm):
        big = {"model": MODEL, "prompt": "x" * 5000}
        r = await client.post("/v1/completions", json=big, headers={"authorization": "Bearer k"})
        assert r.status_code == 413
        assert (await client.get("/health")).status_code == 200
        for path in ("/ready", "/metrics", "/v1/models"):
            assert (await client.get(path)).status_code == 401
            assert (await client.get(path, headers={"authorization": "Bearer wrong"})).status_code == 401
            assert (await client.get(path, headers={"x-api-key": "k"})).status_code == 200
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "ab", "max_tokens": 3},
                              headers={"authorization": "Bearer k"})
        assert r.status_code == 200
        m = (await client.get("/metrics", headers={"authorization": "Bearer k"})).text
        assert 'mindie_requests_total{model_name="fake-model",outcome="length"} 1.0' in m
        assert "mindie_time_to_first_token_seconds_count" in m and "mindie_kv_blocks_free" in m

    run_http(fn, api_key="k", max_request_body_bytes=4096)


def test_http_engine_death_is_a_generic_500_and_health_fails():
    async def fn(client, eng, llm):
        eng.fail_next_step = True
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "ab", "max_tokens": 3})
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "engine_dead" and "injected" not in r.text
        assert (await client.get("/health")).status_code == 503
        assert (await client.get("/ready")).status_code == 503
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "ab", "max_tokens": 3,
                                                       "stream": True})
        assert r.status_code == 500

    run_http(fn)


def test_http_queue_full_is_429_before_the_stream_starts():
    async def fn(client, eng, llm):
        eng.paused = True
        body = {"model": MODEL, "prompt": "ab", "max_tokens": 2}
        first = asyncio.ensure_future(client.post("/v1/completions", json=body | {"n": 2}))
        await wait_for(lambda: eng.stats.num_waiting == 2)
        r = await client.post("/v1/completions", json=body | {"stream": True})
        assert r.status_code == 429 and r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["code"] == "queue_full"
        eng.paused = False
        assert (await first).status_code == 200

    run_http(fn, max_queued_requests=2)
