# SPDX-License-Identifier: Apache-2.0
"""Chat templates rendered in a sandboxed Jinja environment, like Hugging Face's
``apply_chat_template``: ``raise_exception``, ``tojson`` and ``strftime_now`` are available, and
nothing else. Templates come from model files (GGUF metadata, tokenizer_config.json), which are
untrusted: ``ImmutableSandboxedEnvironment`` refuses attribute access to internals such as
``__globals__`` or ``__class__`` and mutation of passed-in objects.

Must not import torch or anything of the package.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import re
from collections.abc import Iterable
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "render", "render_segments", "validate_messages"]


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or the messages are malformed."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def validate_messages(messages: Any, name: str = "messages") -> None:
    """A conversation is a non-empty list of dicts with a string ``role``; ``content`` a string,
    a list of text parts, or absent/None (tool calls)."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError(f"{name}: must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"{name}[{i}]: must be a dict with 'role' and 'content'")
        if not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"{name}[{i}].role: must be a string")
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list)):
            raise ChatTemplateError(f"{name}[{i}].content: must be a string or a list of parts")


def render(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
           template_name: str = "chat_template", **kwargs: Any) -> str:
    """Renders ``messages`` with ``template``; extra keyword arguments (``bos_token``,
    ``eos_token``, ``tools``...) are passed to the template as variables.

    Raises ChatTemplateError (a ValueError) naming the template when it is missing, does not
    compile, raises, or reaches outside the sandbox.
    """
    if not template:
        raise ChatTemplateError(f"{template_name}: the model has no chat template; "
                                "pass raw prompts (generate) instead of messages")
    validate_messages(messages)
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{template_name}: does not compile: {e}") from None
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"{template_name}: refused by the sandbox: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"{template_name}: failed to render: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ChatTemplateError(f"{template_name}: failed to render: {type(e).__name__}: {e}") from None


def render_segments(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                    protect: Iterable[str] = (), template_name: str = "chat_template",
                    **kwargs: Any) -> list[tuple[str, bool]]:
    """The rendered prompt as ``(text, is_content)`` pieces whose concatenation is ``render(...)``.

    A message whose string content contains one of ``protect`` (the tokenizer's special-token
    strings, e.g. ``<|im_end|>``) comes back as its own piece with ``is_content`` true, so that the
    caller tokenizes it as plain text: only the template's own text produces special tokens. The
    pieces are found by rendering once more with each such content replaced by a unique marker;
    a template that changes content other than by trimming it cannot be split safely and is
    refused (ChatTemplateError) rather than tokenized with the content's control strings live.
    """
    full = render(template, messages, add_generation_prompt, template_name, **kwargs)
    protect = [p for p in protect if p]
    risky = [i for i, m in enumerate(messages)
             if isinstance(m, dict) and isinstance(m.get("content"), str) and any(p in m["content"] for p in protect)]
    if not risky:
        return [(full, False)]
    tag = os.urandom(8).hex()
    markers = {f"\ue000{tag}.{i}\ue001": i for i in risky}
    masked = [dict(m) for m in messages]
    for mark, i in markers.items():
        masked[i]["content"] = mark
    text = render(template, masked, add_generation_prompt, template_name, **kwargs)
    for transform in (lambda c: c, str.strip):
        pieces: list[tuple[str, bool]] = []
        for part in re.split(f"(\ue000{tag}\\.\\d+\ue001)", text):
            if part in markers:
                pieces.append((transform(messages[markers[part]]["content"]), True))
            elif part:
                pieces.append((part, False))
        if "".join(p for p, _ in pieces) == full:
            return pieces
    raise ChatTemplateError(f"{template_name}: transforms message content, so content holding control strings "
                            "cannot be tokenized as text; remove them, or set server.chat_content_special_tokens")
