# SPDX-License-Identifier: Apache-2.0
"""Tool calling on ``/v1/chat/completions``: ``tools`` and ``tool_choice`` (none, auto, required,
a named function), as the OpenAI API and vLLM shape them.

Owns: checking the tool list; putting the tool schemas into the prompt (the chat template's
``tools`` variable when the template uses it, else a system message in the Hermes format);
the structured-output spec that makes ``required`` and a named tool work on any model (vLLM's:
an array of ``{"name", "parameters"}`` objects for required, the function's parameters for a
named tool); and the parser of the Hermes / Qwen2 ``<tool_call>{...}</tool_call>`` format used for
``auto``. Must not import the engine or torch.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from mindie_llm.server.protocol_limits import RequestLimitError

__all__ = ["ToolPlan", "may_be_tool_call", "parse_hermes", "plan_tools", "prompt_messages", "tool_call_objects",
           "tool_calls_of"]

_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
_OPEN = "<tool_call>"


@dataclass
class ToolPlan:
    """What a chat request's tools mean for prompting, decoding and the response."""

    mode: str                          # none | auto | required | named
    tools: list[dict[str, Any]]        # the function objects ({name, description, parameters})
    named: str | None = None           # the function of tool_choice={"type": "function", ...}
    guided: dict[str, Any] | None = None   # structured-output spec (required, named)
    parallel: bool = True              # parallel_tool_calls: False = at most one call

    @property
    def active(self) -> bool:
        return self.mode != "none" and bool(self.tools)


def plan_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Any = None) -> ToolPlan:
    """Checks ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` (RequestLimitError naming the
    field) and plans the request. ``parallel_tool_calls`` false (OpenAI: at most one call) limits
    the required array to one item and keeps the first call of an auto reply."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise RequestLimitError("parallel_tool_calls", "must be true or false")
    parallel = parallel_tool_calls is not False
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise RequestLimitError("tool_choice", "needs tools")
        return ToolPlan("none", [])
    if not isinstance(tools, list) or len(tools) > 128:
        raise RequestLimitError("tools", "must be a list of at most 128 tools")
    funcs: list[dict[str, Any]] = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
            raise RequestLimitError(f"tools[{i}]", "must be {\"type\": \"function\", \"function\": {...}}")
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise RequestLimitError(f"tools[{i}].function.name", "must be 1-64 letters, digits, _ . or -")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise RequestLimitError(f"tools[{i}].function.parameters", "must be a JSON Schema object")
        if any(g["name"] == name for g in funcs):
            raise RequestLimitError(f"tools[{i}].function.name", f"{name!r} is given twice")
        funcs.append({"name": name, "description": f.get("description", ""), "parameters": params})
    choice = "auto" if tool_choice is None else tool_choice
    if choice in ("none", "auto"):
        return ToolPlan(choice, funcs, parallel=parallel)
    if choice == "required":
        items = [{"type": "object", "properties": {"name": {"const": f["name"]}, "parameters": f["parameters"]},
                  "required": ["name", "parameters"], "additionalProperties": False} for f in funcs]
        schema = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not parallel:
            schema["maxItems"] = 1
        return ToolPlan("required", funcs, guided={"json": schema}, parallel=parallel)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        f = next((g for g in funcs if g["name"] == name), None)
        if f is None:
            raise RequestLimitError("tool_choice.function.name", f"{str(name)[:64]!r} is not one of the tools")
        return ToolPlan("named", funcs, named=name, guided={"json": f["parameters"]})
    raise RequestLimitError("tool_choice", "must be none, auto, required or {\"type\": \"function\", ...}")


def system_prompt(funcs: list[dict[str, Any]]) -> str:
    """The Hermes tool prompt, for chat templates that do not take ``tools`` themselves."""
    listed = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in funcs)
    return ("You may call one or more functions to assist with the user query.\n\nYou are provided with function "
            f"signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>\n\nFor each function call, "
            "return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
            "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>")


def prompt_messages(messages: list[dict], plan: ToolPlan, template: str | None) -> tuple[list[dict], dict]:
    """(messages, template variables): the template's own ``tools`` support when it has one, else
    the tool prompt merged into the system message."""
    if not plan.active:
        return messages, {}
    if template and "tools" in template:
        return messages, {"tools": [{"type": "function", "function": f} for f in plan.tools]}
    text = system_prompt(plan.tools)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first.get('content') or ''}\n\n{text}".strip()
        return [first, *messages[1:]], {}
    return [{"role": "system", "content": text}, *messages], {}


def parse_hermes(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(content without the calls or None, [(name, arguments JSON)]) of a Hermes-format reply;
    a malformed call is left in the content."""
    calls: list[tuple[str, str]] = []

    def take(m: re.Match) -> str:
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            return m.group(0)
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return m.group(0)
        calls.append((obj["name"], json.dumps(obj.get("arguments", obj.get("parameters", {})), ensure_ascii=False)))
        return ""

    rest = _TOOL_CALL_RE.sub(take, text).strip()
    return (rest or None) if calls else text, calls


def tool_calls_of(text: str, plan: ToolPlan) -> tuple[str | None, list[tuple[str, str]]]:
    """(content, calls) of a finished reply under ``plan``."""
    if plan.mode == "named":
        return None, [(plan.named or "", text.strip())]
    if plan.mode == "required":
        try:
            items = json.loads(text)
        except ValueError:
            return text, []
        return None, [(it["name"], json.dumps(it.get("parameters", {}), ensure_ascii=False)) for it in items
                      if isinstance(it, dict) and isinstance(it.get("name"), str)]
    if plan.mode == "auto":
        content, calls = parse_hermes(text)
        return content, (calls if plan.parallel else calls[:1])
    return text, []


def may_be_tool_call(prefix: str) -> bool:
    """While streaming in auto mode: could this reply still turn into a tool call?"""
    s = prefix.lstrip()
    return _OPEN.startswith(s) or s.startswith(_OPEN)


def tool_call_objects(calls: list[tuple[str, str]], *, stream: bool = False) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` entries (with ``index`` when streaming)."""
    out = []
    for i, (name, args) in enumerate(calls):
        obj: dict[str, Any] = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                               "function": {"name": name, "arguments": args}}
        if stream:
            obj["index"] = i
        out.append(obj)
    return out
