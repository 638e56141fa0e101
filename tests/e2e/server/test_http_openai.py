# SPDX-License-Identifier: Apache-2.0
"""The official ``openai`` client against a real server (SmolLM2 on the CPU) over loopback.

Oracles: the in-process ``LLM`` on the same weights and config for greedy text (the server must add
and lose nothing), and the server's own non-streaming answer for streaming (same seed, same text).
"""
from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def srv(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_health_ready(srv, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [srv.model]
    assert httpx.get(f"{srv.http_url}/health").status_code == 200
    assert httpx.get(f"{srv.http_url}/ready").status_code == 200


def test_greedy_completion_matches_the_offline_engine(srv, client):
    from server_harness import BASE_CONFIG, SHARED_OVERRIDES, merge
    from mindie_llm import LLM, SamplingParams
    from mindie_llm.config import EngineConfig

    prompts = [PROMPT, "def fibonacci(n):"]
    served = [client.completions.create(model=srv.model, prompt=p, max_tokens=12, temperature=0).choices[0].text
              for p in prompts]
    llm = LLM(config=EngineConfig.from_dict(merge(BASE_CONFIG, SHARED_OVERRIDES)))
    offline = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0))]
    assert served == offline


def test_completion_stream_equals_non_stream_for_the_same_seed(client, srv):
    kw = {"model": srv.model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 1234}
    full = client.completions.create(**kw)
    text = full.choices[0].text
    assert full.usage.completion_tokens == 12 or full.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_equals_non_stream_and_reports_usage(client, srv):
    msgs = [{"role": "user", "content": "Name one fruit."}]
    kw = {"model": srv.model, "messages": msgs, "max_completion_tokens": 10, "temperature": 0.7, "seed": 7}
    full = client.chat.completions.create(**kw)
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and text
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_n_samples_with_seed_are_reproducible(client, srv):
    kw = {"model": srv.model, "prompt": PROMPT, "max_tokens": 8, "n": 3, "temperature": 1.0, "seed": 99}
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in sorted(a.choices, key=lambda c: c.index)] == \
        [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    greedy = client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=8, n=2, temperature=0)
    assert greedy.choices[0].text == greedy.choices[1].text


def test_stop_string_ends_the_text_before_it(client, srv):
    base = client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    words = base.split()
    assert len(words) >= 3, base
    stop = words[2]
    cut = client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == base[:base.index(stop)]


def test_logprobs_completion_and_chat(client, srv):
    r = client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert val <= 0 and 1 <= len(top) <= 3
        # Greedy: the chosen token is the most likely one.
        assert max(top.values()) == pytest.approx(val, abs=1e-4)
    c = client.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
               for t in content)


def test_penalties_and_extensions_are_accepted(client, srv):
    r = client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=6, temperature=0.5,
                                  presence_penalty=0.5, frequency_penalty=0.5, seed=3,
                                  extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    assert r.usage.completion_tokens >= 1


def test_queue_full_and_bad_request_map_to_openai_errors(client, srv):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=srv.model, prompt="", max_tokens=4)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=srv.model, prompt="x", max_tokens=srv.max_model_len)
    assert "max_tokens" in e.value.message


def test_metrics_report_requests_latencies_and_engine_state(client, srv):
    from server_harness import BASE_CONFIG, metric_value

    before = srv.metrics_text()
    done_before = metric_value(before, "mindie_requests_total", outcome="length") if \
        'outcome="length"' in before else 0.0
    gen_before = metric_value(before, "mindie_generation_tokens_total")
    client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=3, temperature=0, extra_body={
        "ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=srv.model, prompt="", max_tokens=3)
    text = srv.metrics_text()
    assert metric_value(text, "mindie_requests_total", outcome="length") == done_before + 1
    assert metric_value(text, "mindie_requests_total", outcome="rejected_invalid") >= 1
    assert metric_value(text, "mindie_generation_tokens_total") >= gen_before + 3
    assert metric_value(text, "mindie_prompt_tokens_total") > 0
    for hist in ("mindie_time_to_first_token_seconds", "mindie_time_per_output_token_seconds",
                 "mindie_e2e_request_latency_seconds"):
        assert metric_value(text, f"{hist}_count") >= 1
    assert metric_value(text, "mindie_kv_blocks_total") == BASE_CONFIG["cache"]["num_blocks"]
    assert metric_value(text, "mindie_num_requests_running") == 0
    assert metric_value(text, "mindie_kv_cache_usage_ratio") == 0.0
    assert 0.0 <= metric_value(text, "mindie_prefix_cache_hit_rate") <= 1.0
    assert metric_value(text, "mindie_num_preemptions_total") >= 0
    assert metric_value(text, "mindie_engine_live") == 1.0
