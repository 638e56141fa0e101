# SPDX-License-Identifier: Apache-2.0
"""vLLM's HTTP surface over the fake engine (in process): model_not_found, /tokenize, /detokenize,
/version, several prompts in one completions request, echo, best_of, continuous usage stats and
"not supported" refusals. Oracle: the fake engine's hand-computable text (expected_text).
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from mindie_llm.config import EngineConfig
from mindie_llm.engine.async_llm import AsyncLLM
from mindie_llm.server.http.app import build_app

from test_http_fake_engine import FakeEngine, expected_text

pytestmark = pytest.mark.timeout(60)
M = "fake-model"


def run(fn, **server):
    async def main():
        eng = FakeEngine()
        cfg = EngineConfig.from_dict({"server": server})
        llm = AsyncLLM(eng, cfg)
        app = build_app(llm, cfg)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as c:
            try:
                return await fn(c)
            finally:
                await llm.shutdown()

    return asyncio.run(main())


def sse(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    assert text.rstrip().endswith("data: [DONE]")
    return out


@pytest.mark.parametrize("path,body", [("/v1/completions", {"model": "gpt-x", "prompt": "a"}),
                                       ("/v1/chat/completions", {"model": "gpt-x", "messages": [
                                           {"role": "user", "content": "a"}]})])
def test_unknown_model_is_404_model_not_found(path, body):
    r = run(lambda c: c.post(path, json=body))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["param"] == "model"


def test_tokenize_detokenize_version():
    async def fn(c):
        t = (await c.post("/tokenize", json={"model": M, "prompt": "abc"})).json()
        m = (await c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})).json()
        d = (await c.post("/detokenize", json={"model": M, "tokens": t["tokens"]})).json()
        v = (await c.get("/version")).json()
        bad = await c.post("/detokenize", json={"tokens": [10 ** 6]})
        both = await c.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "x"}]})
        return t, m, d, v, bad, both

    t, m, d, v, bad, both = run(fn)
    assert t == {"count": 3, "max_model_len": 256, "tokens": [97, 98, 99]}
    assert m["count"] == len("<user>hi\n<assistant>")
    assert d == {"prompt": "abc"} and isinstance(v["version"], str)
    assert bad.status_code == 400 and both.status_code == 400


def test_list_of_prompts_gives_one_choice_set_per_prompt():
    body = {"model": M, "prompt": ["ab", "xy"], "max_tokens": 3, "n": 2}

    async def fn(c):
        r = await c.post("/v1/completions", json=body)
        s = await c.post("/v1/completions", json=body | {"stream": True, "stream_options": {"include_usage": True}})
        ids = await c.post("/v1/completions", json={"model": M, "prompt": [[97], [98, 99]], "max_tokens": 2})
        return r, s, ids

    r, s, ids = run(fn)
    j = r.json()
    assert [c["index"] for c in j["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in j["choices"]] == [expected_text("ab", 3)] * 2 + [expected_text("xy", 3)] * 2
    assert j["usage"] == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}
    chunks = sse(s.text)
    texts: dict[int, str] = {}
    for ch in chunks:
        for c in ch["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert texts == {0: expected_text("ab", 3), 1: expected_text("ab", 3), 2: expected_text("xy", 3),
                     3: expected_text("xy", 3)}
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    assert [c["text"] for c in ids.json()["choices"]] == [expected_text("a", 2), expected_text("bc", 2)]


def test_echo_best_of_and_continuous_usage():
    async def fn(c):
        echo = await c.post("/v1/completions", json={"model": M, "prompt": "hey", "max_tokens": 2, "echo": True})
        echo_s = await c.post("/v1/completions", json={"model": M, "prompt": "hey", "max_tokens": 2, "echo": True,
                                                        "stream": True})
        best = await c.post("/v1/completions", json={"model": M, "prompt": "a", "max_tokens": 2, "best_of": 3})
        best_bad = await c.post("/v1/completions", json={"model": M, "prompt": "a", "best_of": 2, "n": 3})
        best_stream = await c.post("/v1/completions", json={"model": M, "prompt": "a", "best_of": 2,
                                                             "stream": True})
        cont = await c.post("/v1/completions", json={"model": M, "prompt": "a", "max_tokens": 3, "stream": True,
                                                      "stream_options": {"include_usage": True,
                                                                         "continuous_usage_stats": True}})
        return echo, echo_s, best, best_bad, best_stream, cont

    echo, echo_s, best, best_bad, best_stream, cont = run(fn)
    assert echo.json()["choices"][0]["text"] == "hey" + expected_text("hey", 2)
    assert "".join(c["choices"][0]["text"] for c in sse(echo_s.text) if c["choices"]) == "hey" + expected_text("hey", 2)
    b = best.json()
    assert len(b["choices"]) == 1 and b["choices"][0]["logprobs"] is None
    assert b["usage"]["completion_tokens"] == 6   # all best_of samples are generated (and billed)
    assert best_bad.status_code == 400 and best_bad.json()["error"]["param"] == "best_of"
    assert best_stream.status_code == 400 and best_stream.json()["error"]["param"] == "best_of"
    usages = [c["usage"]["completion_tokens"] for c in sse(cont.text)]
    assert usages == sorted(usages) and usages[0] >= 1 and usages[-1] == 3


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "required"),
    ("guided_whitespace_pattern", " "),
    ("suffix", "x"),
])
def test_known_but_unsupported_fields_say_not_supported(field, value):
    async def fn(c):
        chat = await c.post("/v1/chat/completions", json={"model": M, "messages": [{"role": "user", "content": "a"}],
                                                           field: value})
        cmpl = await c.post("/v1/completions", json={"model": M, "prompt": "a", field: value})
        return chat, cmpl

    chat, cmpl = run(fn)
    for r in (cmpl,) if field in ("tools", "tool_choice") else (chat, cmpl):   # tools are a chat feature
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == field and "not supported" in err["message"]


def test_null_and_neutral_values_of_unsupported_fields_are_accepted():
    async def fn(c):
        return await c.post("/v1/chat/completions", json={
            "model": M, "messages": [{"role": "user", "content": "a"}], "max_tokens": 2, "logit_bias": None,
            "tools": [], "tool_choice": "none", "response_format": {"type": "text"}})

    r = run(fn)
    assert r.status_code == 200, r.text


VLLM_NAMES = ["mindie:num_requests_running", "mindie:num_requests_waiting", "mindie:kv_cache_usage_perc",
              "mindie:prefix_cache_queries_total", "mindie:prefix_cache_hits_total", "mindie:num_preemptions_total",
              "mindie:prompt_tokens_total", "mindie:generation_tokens_total", "mindie:request_success_total",
              "mindie:time_to_first_token_seconds_count", "mindie:inter_token_latency_seconds_count",
              "mindie:time_per_output_token_seconds_count", "mindie:e2e_request_latency_seconds_count",
              "mindie:request_queue_time_seconds_count", "mindie:request_prefill_time_seconds_count",
              "mindie:request_decode_time_seconds_count", "mindie:request_inference_time_seconds_count",
              "mindie:request_prompt_tokens_sum", "mindie:request_generation_tokens_sum"]


def test_metrics_have_vllm_names_under_the_mindie_prefix():
    from server_harness import metric_value

    async def fn(c):
        r = await c.post("/v1/completions", json={"model": M, "prompt": "abcd", "max_tokens": 6})
        assert r.status_code == 200
        return (await c.get("/metrics")).text

    text = run(fn)
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    missing = [n for n in VLLM_NAMES if n not in names]
    assert not missing, missing
    assert metric_value(text, "mindie:request_success_total", finished_reason="length") == 1
    assert metric_value(text, "mindie:request_generation_tokens_sum") == 6
    assert metric_value(text, "mindie:request_prompt_tokens_sum") == 4
    assert metric_value(text, "mindie:inter_token_latency_seconds_count") == 5   # one per token after the first


def test_a_model_without_tokenizer_says_so():
    async def main():
        eng = FakeEngine()
        eng.tokenizer = None
        cfg = EngineConfig.from_dict({})
        llm = AsyncLLM(eng, cfg)
        app = build_app(llm, cfg)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            a = await c.post("/v1/completions", json={"model": M, "prompt": "hi"})
            b = await c.post("/v1/chat/completions", json={"model": M, "messages": [{"role": "user", "content": "x"}]})
        await llm.shutdown()
        return a, b

    for r in asyncio.run(main()):
        assert r.status_code == 400, r.text
        msg = r.json()["error"]["message"]
        assert "no tokenizer" in msg and "tokenizer.json" in msg and "dummy" not in msg


class ScriptedEngine(FakeEngine):
    """Replies with ``script`` one character per step (the oracle of the tool-call tests)."""

    def __init__(self, script: str) -> None:
        super().__init__(max_model_len=4096)
        self.script = script

    def step(self):
        from mindie_llm.outputs import CompletionOutput, RequestMetrics, RequestOutput

        outs = []
        for r in list(self.reqs.values()):
            s = r.samples[0]
            s.append(ord(self.script[len(s)]))
            done = len(s) == len(self.script) or len(s) >= r.params.max_tokens
            comp = CompletionOutput(0, "".join(chr(t) for t in s), list(s), None, None,
                                    ("stop" if len(s) == len(self.script) else "length") if done else None)
            outs.append(RequestOutput(r.rid, None, list(r.prompt_ids), None, [comp], done,
                                      RequestMetrics(arrival_time=0.0)))
            if done:
                del self.reqs[r.rid]
        return outs


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _scripted(script: str, body: dict):
    async def main():
        eng = ScriptedEngine(script)
        cfg = EngineConfig.from_dict({"server": {"max_tokens_limit": 4096}})
        llm = AsyncLLM(eng, cfg)
        app = build_app(llm, cfg)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as c:
            r = await c.post("/v1/chat/completions", json=body)
            s = await c.post("/v1/chat/completions", json=body | {"stream": True})
        await llm.shutdown()
        return r, s

    return asyncio.run(main())


def test_auto_tool_calls_are_parsed_streaming_and_not():
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    body = {"model": M, "messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS, "max_tokens": 500}
    r, s = _scripted(call, body)
    ch = r.json()["choices"][0]
    assert ch["finish_reason"] == "tool_calls" and ch["message"]["content"] is None
    tc = ch["message"]["tool_calls"][0]
    assert tc["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'} and tc["type"] == "function"
    chunks = sse(s.text)
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    assert not any(d["delta"].get("content") for d in deltas)          # the call is not leaked as text
    assert deltas[-1]["finish_reason"] == "tool_calls"
    assert deltas[-1]["delta"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'


def test_auto_plain_answer_streams_as_content():
    body = {"model": M, "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "max_tokens": 500}
    r, s = _scripted("Hello there", body)
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "Hello there"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in sse(s.text) if c["choices"])
    assert text == "Hello there"
