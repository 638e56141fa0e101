# SPDX-License-Identifier: Apache-2.0
"""server/http/tools.py: tool lists are checked naming the field, tool_choice becomes the right
structured-output spec (vLLM's shapes), and the Hermes parser finds the calls. Oracles: the
OpenAI / vLLM request and response shapes written out by hand."""
from __future__ import annotations

import json

import pytest

from mindie_llm.server.http.tools import (
    may_be_tool_call,
    parse_hermes,
    plan_tools,
    prompt_messages,
    tool_call_objects,
    tool_calls_of,
)
from mindie_llm.server.protocol_limits import RequestLimitError

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_modes_and_specs():
    assert plan_tools(None, None).mode == "none" and not plan_tools([WEATHER], "none").active
    auto = plan_tools([WEATHER], None)
    assert auto.mode == "auto" and auto.guided is None
    req = plan_tools([WEATHER, TIME], "required")
    items = req.guided["json"]["items"]["anyOf"]
    assert [i["properties"]["name"]["const"] for i in items] == ["get_weather", "get_time"]
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}})
    assert named.named == "get_weather" and named.guided == {"json": WEATHER["function"]["parameters"]}


@pytest.mark.parametrize("tools,choice,param", [
    ([{"type": "function", "function": {"name": "bad name"}}], None, "tools[0].function.name"),
    ([{"type": "retrieval"}], None, "tools[0]"),
    ([WEATHER, WEATHER], None, "tools[1].function.name"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
    ([WEATHER], "sometimes", "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_bad_tools_name_the_field(tools, choice, param):
    with pytest.raises(RequestLimitError) as e:
        plan_tools(tools, choice)
    assert e.value.param == param


def test_hermes_parser_and_results():
    text = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = parse_hermes(text)
    assert content == "Sure." and calls == [("get_weather", '{"city": "Paris"}')]
    assert parse_hermes("<tool_call>{not json}</tool_call>") == ("<tool_call>{not json}</tool_call>", [])
    req = plan_tools([WEATHER], "required")
    assert tool_calls_of('[{"name": "get_weather", "parameters": {"city": "Oslo"}}]', req)[1] == \
        [("get_weather", '{"city": "Oslo"}')]
    named = plan_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    assert tool_calls_of('{"city": "Rome"}', named) == (None, [("get_weather", '{"city": "Rome"}')])
    objs = tool_call_objects([("f", "{}")], stream=True)
    assert objs[0]["type"] == "function" and objs[0]["index"] == 0 and objs[0]["id"].startswith("call_")
    assert may_be_tool_call("  <tool") and may_be_tool_call("<tool_call>{") and not may_be_tool_call("Hello")


def test_tools_reach_the_prompt():
    plan = plan_tools([WEATHER], None)
    msgs, kw = prompt_messages([{"role": "user", "content": "hi"}], plan, "{{ messages }}")
    assert kw == {} and msgs[0]["role"] == "system" and "get_weather" in msgs[0]["content"]
    msgs, kw = prompt_messages([{"role": "user", "content": "hi"}], plan, "{% if tools %}{{ tools }}{% endif %}")
    assert msgs == [{"role": "user", "content": "hi"}] and kw["tools"][0]["function"]["name"] == "get_weather"
    assert json.loads(json.dumps(kw))   # plain JSON for the template


def test_parallel_tool_calls_false_allows_one_call():
    # OpenAI: parallel_tool_calls=false means at most one call. Required: the array schema takes one
    # item; auto: the first parsed call is kept. A non-boolean names the field.
    one = plan_tools([WEATHER], "required", False)
    assert one.guided["json"]["maxItems"] == 1 and "maxItems" not in plan_tools([WEATHER], "required").guided["json"]
    two = ('<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>'
           '<tool_call>{"name": "get_weather", "arguments": {"city": "B"}}</tool_call>')
    assert len(tool_calls_of(two, plan_tools([WEATHER], "auto"))[1]) == 2
    assert tool_calls_of(two, plan_tools([WEATHER], "auto", False))[1] == [("get_weather", '{"city": "A"}')]
    with pytest.raises(ValueError, match="parallel_tool_calls"):
        plan_tools([WEATHER], "auto", "no")
