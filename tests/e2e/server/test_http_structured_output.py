# SPDX-License-Identifier: Apache-2.0
"""Structured output and tool calling over HTTP with the official openai client, on the real model.

Oracles: the JSON Schema (the reply parses and satisfies it), the tool's parameter schema (the
arguments of the call parse and carry the required field), and the OpenAI response shape
(``tool_calls``, finish_reason ``tool_calls``), streaming and not; the client's tool-calling
round trip (call -> tool result -> answer) runs unchanged.
"""
from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

M = "SmolLM2-135M-Instruct"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}]
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def client(shared_server):
    return openai.OpenAI(base_url=f"{shared_server.http_url}/v1", api_key="x", max_retries=0, timeout=300)


def test_response_format_json_schema(client):
    r = client.chat.completions.create(
        model=M, messages=[{"role": "user", "content": "Is the sky blue? Reply in JSON."}], max_tokens=30,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}})
    assert json.loads(r.choices[0].message.content)["answer"] in ("yes", "no")
    bad = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 3, "maximum": 1}}, "required": ["a"]}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=M, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {"name": "b", "schema": bad}})
    assert e.value.body["param"] == "response_format.json_schema.schema"


def test_guided_choice_via_extra_body(client):
    r = client.completions.create(model=M, prompt="Colour:", max_tokens=8,
                                  extra_body={"guided_choice": ["red", "blue"]})
    assert r.choices[0].text in ("red", "blue")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_openai_tool_calling_round_trip(client, tool_choice):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=M, messages=messages, tools=TOOLS, tool_choice=tool_choice,
                                       max_tokens=40, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    # The client's example: append the call and the tool's result, ask again.
    messages.append(choice.message)
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "22 C and sunny"})
    final = client.chat.completions.create(model=M, messages=messages, tools=TOOLS, max_tokens=12, temperature=0)
    assert final.choices[0].message.content is not None or final.choices[0].message.tool_calls


def test_required_tool_call_streams(client):
    stream = client.chat.completions.create(
        model=M, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS, tool_choice="required",
        max_tokens=40, temperature=0, stream=True)
    calls, finish, content = [], None, ""
    for chunk in stream:
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and not content
    assert calls[0].function.name == "get_weather" and "city" in json.loads(calls[0].function.arguments)
