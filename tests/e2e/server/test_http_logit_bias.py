# SPDX-License-Identifier: Apache-2.0
"""``logit_bias`` over HTTP with the official openai client, on the real model (SmolLM2 on the CPU).

Oracles: the definition (+100 on one token forces it: the text is that token repeated, as
``/detokenize`` spells it, greedy and sampled; -100 on the greedy first token moves the greedy
choice off it), the same request without a bias (its top logprobs: returned logprobs are those of
the unbiased distribution, as vLLM), and the documented error field on completions and chat.
"""
from __future__ import annotations

import httpx
import pytest

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

M = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def srv(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key="x", max_retries=0, timeout=300)


def _token(srv, text: str) -> int:
    ids = httpx.post(f"{srv.http_url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert len(ids) == 1, ids
    return ids[0]


def _detok(srv, ids: list[int]) -> str:
    return httpx.post(f"{srv.http_url}/detokenize", json={"tokens": ids}).json()["prompt"]


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=5)])
def test_plus_100_forces_the_token_on_completions_and_chat(srv, client, sampling):
    t = _token(srv, " banana")
    want = _detok(srv, [t] * 4)
    cmpl = client.completions.create(model=M, prompt=PROMPT, max_tokens=4, logit_bias={str(t): 100}, **sampling)
    assert cmpl.choices[0].text == want and cmpl.usage.completion_tokens == 4
    chat = client.chat.completions.create(model=M, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4,
                                          logit_bias={str(t): 100}, **sampling)
    assert chat.choices[0].message.content == want and chat.choices[0].finish_reason == "length"
    if sampling["temperature"] == 0:   # one streamed case is enough (the bias is not a streaming matter)
        stream = client.completions.create(model=M, prompt=PROMPT, max_tokens=4, logit_bias={str(t): 100},
                                           stream=True, **sampling)
        assert "".join(c.choices[0].text for c in stream if c.choices) == want


def test_minus_100_bans_the_greedy_token_and_logprobs_stay_unbiased(srv, client):
    kw = dict(model=M, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    plain = client.completions.create(**kw).choices[0].logprobs
    first = plain.tokens[0]                                   # the greedy first token (its text)
    banned = _token(srv, first)
    assert _detok(srv, [banned]) == first
    got = client.completions.create(**kw, logit_bias={str(banned): -100}).choices[0].logprobs
    assert got.tokens[0] != first                             # the greedy choice moved off it
    assert got.top_logprobs[0] == pytest.approx(plain.top_logprobs[0])   # raw (unbiased) distribution, as vLLM
    assert max(got.top_logprobs[0], key=got.top_logprobs[0].get) == first


@pytest.mark.parametrize("bias,words", [
    ({"abc": 1}, "not a token id"),
    ({"-3": 1}, "not a token id"),
    ({"5": 101}, "[-100, 100]"),
    ({"5": "x"}, "[-100, 100]"),
    ({"49152": 1}, "outside the vocabulary"),
    ({str(i): 1 for i in range(301)}, "at most 300"),
])
def test_bad_logit_bias_is_a_400_naming_the_field(client, bias, words):
    for call in (lambda: client.completions.create(model=M, prompt="x", max_tokens=2, logit_bias=bias),
                 lambda: client.chat.completions.create(model=M, messages=[{"role": "user", "content": "x"}],
                                                        max_tokens=2, logit_bias=bias)):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.body["param"] == "logit_bias" and words in e.value.body["message"], e.value.body
