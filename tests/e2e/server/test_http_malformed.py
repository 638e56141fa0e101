# SPDX-License-Identifier: Apache-2.0
"""Malformed HTTP requests against a real server: each gets a 4xx naming the field, never a 5xx or a
traceback, and a canary request afterwards still succeeds. Then schemathesis fuzzes the OpenAPI
schema (bounded examples), expecting no 5xx.

Oracle: the table itself (expected status and field per row) and the canary's success.
"""
from __future__ import annotations

import json

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

M = "SmolLM2-135M-Instruct"
C = "/v1/completions"
CH = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def _nested(depth: int) -> bytes:
    return b'{"model":"' + M.encode() + b'","prompt":' + b"[" * depth + b"]" * depth + b"}"


# (id, path, body (dict -> JSON, bytes -> raw), expected statuses, field the error must name)
CASES = [
    ("missing-model", C, {"prompt": "x"}, {400, 422}, "model"),
    ("missing-prompt", C, {"model": M}, {400, 422}, "prompt"),
    ("missing-messages", CH, {"model": M}, {400, 422}, "messages"),
    ("model-wrong-type", C, {"model": 5, "prompt": "x"}, {400, 422}, "model"),
    ("unknown-model", C, {"model": "gpt-17", "prompt": "x"}, {400, 404}, "model"),
    ("unknown-model-chat", CH, {"model": "gpt-17", "messages": MSG}, {400, 404}, "model"),
    ("prompt-wrong-type", C, {"model": M, "prompt": 12}, {400, 422}, "prompt"),
    ("prompt-empty", C, {"model": M, "prompt": ""}, {400, 422}, "prompt"),
    ("prompt-empty-ids", C, {"model": M, "prompt": []}, {400, 422}, "prompt"),
    ("prompt-id-out-of-vocab", C, {"model": M, "prompt": [10**9]}, {400, 422}, "prompt"),
    ("prompt-negative-id", C, {"model": M, "prompt": [-1]}, {400, 422}, "prompt"),
    ("prompt-too-long", C, {"model": M, "prompt": "hello " * 2000, "max_tokens": 4}, {400, 413, 422}, "prompt"),
    ("max-tokens-string", C, {"model": M, "prompt": "x", "max_tokens": "5"}, {400, 422}, "max_tokens"),
    ("max-tokens-zero", C, {"model": M, "prompt": "x", "max_tokens": 0}, {400, 422}, "max_tokens"),
    ("max-tokens-negative", C, {"model": M, "prompt": "x", "max_tokens": -3}, {400, 422}, "max_tokens"),
    ("max-tokens-huge", C, {"model": M, "prompt": "x", "max_tokens": 10**40}, {400, 422}, "max_tokens"),
    ("max-tokens-over-limit", C, {"model": M, "prompt": "x", "max_tokens": 100000}, {400, 422}, "max_tokens"),
    ("max-tokens-float", C, {"model": M, "prompt": "x", "max_tokens": 2.5}, {400, 422}, "max_tokens"),
    ("temperature-negative", C, {"model": M, "prompt": "x", "temperature": -0.5}, {400, 422}, "temperature"),
    ("temperature-string", C, {"model": M, "prompt": "x", "temperature": "hot"}, {400, 422}, "temperature"),
    ("top-p-zero", C, {"model": M, "prompt": "x", "top_p": 0}, {400, 422}, "top_p"),
    ("top-p-above-one", C, {"model": M, "prompt": "x", "top_p": 1.5}, {400, 422}, "top_p"),
    ("top-k-below-minus-one", C, {"model": M, "prompt": "x", "top_k": -2}, {400, 422}, "top_k"),
    ("n-zero", C, {"model": M, "prompt": "x", "n": 0}, {400, 422}, "n"),
    ("n-over-max", C, {"model": M, "prompt": "x", "n": 9}, {400, 422}, "n"),
    ("n-bool", C, {"model": M, "prompt": "x", "n": True}, {400, 422}, "n"),
    ("presence-out-of-range", C, {"model": M, "prompt": "x", "presence_penalty": 3}, {400, 422}, "presence_penalty"),
    ("frequency-nan", C, b'{"model":"' + M.encode() + b'","prompt":"x","frequency_penalty":NaN}',
     {400, 422}, "frequency_penalty"),
    ("repetition-zero", C, {"model": M, "prompt": "x", "repetition_penalty": 0}, {400, 422}, "repetition_penalty"),
    ("seed-out-of-int64", C, {"model": M, "prompt": "x", "seed": 2**64}, {400, 422}, "seed"),
    ("logprobs-over-limit", C, {"model": M, "prompt": "x", "logprobs": 50}, {400, 422}, "logprobs"),
    ("top-logprobs-without-logprobs", CH, {"model": M, "messages": MSG, "top_logprobs": 3}, {400, 422},
     "top_logprobs"),
    ("top-logprobs-over-limit", CH, {"model": M, "messages": MSG, "logprobs": True, "top_logprobs": 21},
     {400, 422}, "top_logprobs"),
    ("stop-too-many", C, {"model": M, "prompt": "x", "stop": ["a"] * 17}, {400, 422}, "stop"),
    ("stop-too-long", C, {"model": M, "prompt": "x", "stop": ["a" * 300]}, {400, 422}, "stop"),
    ("stop-empty-string", C, {"model": M, "prompt": "x", "stop": [""]}, {400, 422}, "stop"),
    ("stop-wrong-type", C, {"model": M, "prompt": "x", "stop": 5}, {400, 422}, "stop"),
    ("min-tokens-over-max", C, {"model": M, "prompt": "x", "max_tokens": 2, "min_tokens": 5}, {400, 422},
     "min_tokens"),
    ("unknown-field", C, {"model": M, "prompt": "x", "best_of": 4}, {400, 422}, "best_of"),
    ("unknown-nested-field", CH, {"model": M, "messages": [{"role": "user", "content": "x", "evil": 1}]},
     {400, 422}, "messages[0].evil"),
    ("messages-empty", CH, {"model": M, "messages": []}, {400, 422}, "messages"),
    ("message-bad-role", CH, {"model": M, "messages": [{"role": "root", "content": "x"}]}, {400, 422},
     "messages[0].role"),
    ("message-content-number", CH, {"model": M, "messages": [{"role": "user", "content": 7}]}, {400, 422},
     "messages[0].content"),
    ("stream-options-without-stream", C, {"model": M, "prompt": "x", "stream_options": {"include_usage": True}},
     {400, 422}, "stream_options"),
    ("stream-not-bool", C, {"model": M, "prompt": "x", "stream": "yes"}, {400, 422}, "stream"),
    ("conflicting-max-tokens", CH, {"model": M, "messages": MSG, "max_tokens": 3, "max_completion_tokens": 4},
     {400, 422}, "max_completion_tokens"),
    ("body-not-json", C, b"this is not json", {400, 422}, "body"),
    ("body-json-array", C, b"[1,2,3]", {400, 422}, "body"),
    ("body-invalid-utf8", C, b'{"model":"' + M.encode() + b'","prompt":"\xff\xfe\xfd"}', {400, 422}, "body"),
    ("body-deeply-nested", C, _nested(100000), {400, 413, 422}, "body"),
    ("body-oversized", C, {"model": M, "prompt": "x" * (2 << 20)}, {413}, "body"),
    ("body-empty", C, b"", {400, 422}, "body"),
]


@pytest.fixture(scope="module")
def srv(server_factory):
    # Small caps keep the fuzzed generations short on the CPU.
    return server_factory({"server": {"max_tokens_limit": 8}, "scheduler": {"max_n": 2}})


def _post(srv, path: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(srv.http_url + path, content=content, headers={"content-type": "application/json"},
                      timeout=60)


def _canary(srv) -> None:
    r = _post(srv, C, {"model": M, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_table_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name,path,body,statuses,param", CASES, ids=[c[0] for c in CASES])
def test_malformed_request_is_refused_naming_the_field(srv, name, path, body, statuses, param):
    r = _post(srv, path, body)
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert err["param"] == param or param in err["message"], err
    for leak in ("Traceback", "File \"", "site-packages", "Exception"):
        assert leak not in r.text
    _canary(srv)


def test_wrong_method_and_route(srv):
    assert httpx.get(srv.http_url + C).status_code == 405
    assert httpx.post(srv.http_url + "/v1/nope", json={}).status_code == 404
    _canary(srv)


def _fuzz(srv, label: str, strategy, failures: list) -> None:
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(max_examples=25, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        resp = case.call(base_url=srv.http_url, timeout=60)
        if resp.status_code >= 500:
            failures.append((label, resp.status_code, resp.text[:300]))

    run()


def test_schemathesis_finds_no_server_error(srv):
    """Fuzzes every operation of /openapi.json (bounded examples); any 5xx fails."""
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{srv.http_url}/openapi.json")
    failures = []
    for result in schema.get_all_operations():
        op = result.ok()
        strategy = op.as_strategy()

        _fuzz(srv, op.label, strategy, failures)
    assert not failures, failures[:5]
    _canary(srv)
