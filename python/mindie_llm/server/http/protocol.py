# SPDX-License-Identifier: Apache-2.0
"""OpenAI-compatible request bodies (pydantic) and their mapping to ``SamplingParams``.

Owns the wire schema of ``/v1/completions`` and ``/v1/chat/completions``: unknown fields are
refused (``extra="forbid"``), every numeric field is bounded here or by ``RequestLimits``.
Must not import the engine loop, torch or FastAPI.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)

from mindie_llm.server.protocol_limits import RequestLimitError, RequestLimits

__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "DetokenizeRequest", "StreamOptions",
           "TokenizeRequest", "logit_bias_from_wire", "to_sampling_kwargs"]

_INT64_MAX = (1 << 63) - 1
_INT32_MAX = (1 << 31) - 1


def _valid_unicode(v: str) -> str:
    """JSON may carry lone surrogates (``"\\ud800"``) that no tokenizer can encode: refused here,
    naming the field, instead of failing deep inside the engine."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode (contains a lone surrogate)") from None
    return v


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
# Token ids on the wire: int32 on the step message; the vocabulary bound is checked by the handler.
TokenId = Annotated[StrictInt, Field(ge=0, le=_INT32_MAX)]
Number = StrictInt | StrictFloat


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False   # vLLM: usage in every chunk


# OpenAI / vLLM fields this server knows but does not implement: accepted when absent or null
# (clients send some as null), refused with "not supported" otherwise (not "unknown field").
NOT_SUPPORTED_FIELDS = (
    "tools", "tool_choice", "functions", "function_call",
    "parallel_tool_calls", "guided_decoding_backend", "guided_whitespace_pattern", "suffix", "audio",
    "modalities", "prediction", "reasoning_effort", "web_search_options", "lora_request",
)
# Structured output: wire field -> how it becomes SamplingParams.guided_decoding.
GUIDED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                 "structured_outputs")


class _NotSupported(_Strict):
    """Declared so that a client sending them learns they are not supported (and, for the
    structured-output fields and ``logit_bias``, typed by hand so that errors name the field)."""

    logit_bias: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    structured_outputs: Any = None
    suffix: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    lora_request: Any = None

    def check_supported(self, chat: bool = False) -> None:
        """``chat``: tools, tool_choice and parallel_tool_calls are chat features (server/http/tools.py)."""
        for name in NOT_SUPPORTED_FIELDS:
            if chat and name in ("tools", "tool_choice", "parallel_tool_calls"):
                continue
            v = getattr(self, name)
            if v is None or (name == "tool_choice" and v == "none") or (name == "tools" and v == []) or \
                    (name == "parallel_tool_calls" and not self.tools):
                continue
            raise RequestLimitError(name, "not supported by this server")

    def guided_spec(self) -> tuple[dict[str, Any] | None, str | None]:
        """(SamplingParams.guided_decoding, the wire field it came from); at most one field may ask."""
        given = [n for n in GUIDED_FIELDS if getattr(self, n) is not None]
        rf = self.response_format
        if rf is not None:
            if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
                raise RequestLimitError("response_format", "type must be text, json_object or json_schema")
            if rf["type"] == "text":
                given.remove("response_format")
        if not given:
            return None, None
        if len(given) > 1:
            raise RequestLimitError(given[1], f"conflicts with {given[0]}; send one structured-output field")
        name = given[0]
        v = getattr(self, name)
        if name == "response_format":
            if rf["type"] == "json_object":
                return {"json_object": True}, name
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
                raise RequestLimitError("response_format.json_schema", "needs a 'schema' object")
            return {"json": js["schema"]}, "response_format.json_schema.schema"
        if name == "structured_outputs":
            if not isinstance(v, dict):
                raise RequestLimitError(name, "must be an object such as {\"json\": schema}")
            return dict(v), name
        key = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
               "guided_grammar": "grammar"}[name]
        return {key: v}, name


class _SamplingFields(_NotSupported):
    """Fields both endpoints share (OpenAI names, plus vLLM-style extensions)."""

    model: Text = Field(min_length=1, max_length=256)
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=_INT64_MAX)
    # Sampling ranges are SamplingParams' (sampling_params.SAMPLING_BOUNDS), the same on every front end.
    temperature: Number | None = None
    top_p: Number | None = None
    n: StrictInt = Field(default=1, ge=1, le=1 << 20)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(1 << 63), le=_INT64_MAX)
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    user: Text | None = Field(default=None, max_length=256)
    # Extensions (vLLM names), sent by the openai client through extra_body.
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    min_tokens: StrictInt | None = None
    ignore_eos: StrictBool | None = None
    stop_token_ids: list[StrictInt] | None = Field(default=None, max_length=64)
    skip_special_tokens: StrictBool | None = None
    include_stop_str_in_output: StrictBool | None = None
    priority: StrictInt = Field(default=0, ge=-(1 << 31), le=(1 << 31) - 1)
    prompt_logprobs: StrictInt | None = Field(default=None, ge=0, le=1 << 20)


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: one prompt (text or token ids)."""

    prompt: Text | list[TokenId] | list[Text] | list[list[TokenId]] = Field(
        description="A string, a list of token ids, or a list of either (one choice set per prompt)")
    logprobs: StrictInt | None = Field(default=None, ge=0, le=1 << 20)
    echo: StrictBool = False
    best_of: StrictInt | None = Field(default=None, ge=1, le=1 << 20)


class ChatContentPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[ChatContentPart] | None = None
    name: Text | None = Field(default=None, max_length=256)
    tool_calls: list[dict[str, Any]] | None = Field(default=None, max_length=128)   # an assistant's earlier calls
    tool_call_id: Text | None = Field(default=None, max_length=256)                 # a tool message's call
    # Sent back by the openai client when a reply message is appended to the conversation.
    refusal: Text | None = None
    annotations: list[Any] | None = None
    audio: Any = None
    function_call: Any = None

    def as_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it (earlier tool calls also as Hermes text, for
        templates that only read ``content``)."""
        d: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            d["tool_calls"] = self.tool_calls
            calls = "\n".join("<tool_call>\n" + json.dumps({"name": (c.get("function") or {}).get("name"),
                                                             "arguments": _args((c.get("function") or {}))})
                              + "\n</tool_call>" for c in self.tool_calls if isinstance(c, dict))
            d["content"] = f"{d['content']}\n{calls}".strip()
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            d["name"] = self.name
        return d

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


def _args(function: dict[str, Any]) -> Any:
    args = function.get("arguments", {})
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=_INT64_MAX)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=1 << 20)
    add_generation_prompt: StrictBool = True


class TokenizeRequest(_Strict):
    """``POST /tokenize`` (vLLM): a prompt, or chat messages rendered by the chat template."""

    model: Text | None = Field(default=None, max_length=256)
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=1024)
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Strict):
    """``POST /detokenize`` (vLLM)."""

    model: Text | None = Field(default=None, max_length=256)
    tokens: list[TokenId] = Field(max_length=1 << 20)


def logit_bias_from_wire(v: Any) -> dict[int, Any] | None:
    """OpenAI's ``logit_bias`` (a JSON object: token id as a decimal string -> bias) as
    SamplingParams wants it ({int: number}); SamplingParams checks the ranges and the entry cap,
    the engine the vocabulary. Raises RequestLimitError naming ``logit_bias``."""
    from mindie_llm.sampling_params import MAX_LOGIT_BIAS_ENTRIES

    if v is None:
        return None
    if not isinstance(v, dict):
        raise RequestLimitError("logit_bias", "must be an object mapping token ids to biases")
    if len(v) > MAX_LOGIT_BIAS_ENTRIES:
        raise RequestLimitError("logit_bias", f"at most {MAX_LOGIT_BIAS_ENTRIES} entries; got {len(v)}")
    out: dict[int, Any] = {}
    for k, bias in v.items():
        if not (isinstance(k, str) and 0 < len(k) <= 10 and k.isascii() and k.isdigit()):
            raise RequestLimitError("logit_bias", f"key {str(k)[:32]!r} is not a token id (a decimal integer)")
        out[int(k)] = bias
    return out


def _resolve_max_tokens(req: _SamplingFields, default: int) -> tuple[int, str]:
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        if req.max_tokens is not None and req.max_tokens != req.max_completion_tokens:
            raise RequestLimitError("max_completion_tokens", "conflicts with max_tokens; send one of them")
        return req.max_completion_tokens, "max_completion_tokens"
    if req.max_tokens is not None:
        return req.max_tokens, "max_tokens"
    return default, "max_tokens"


def to_sampling_kwargs(req: CompletionRequest | ChatCompletionRequest, limits: RequestLimits,
                       *, default_max_tokens: int) -> dict[str, Any]:
    """Checks ``req`` against ``limits`` and returns keyword arguments for ``SamplingParams``.

    Raises :class:`RequestLimitError` (a ValueError) naming the wire field.
    """
    req.check_supported(chat=isinstance(req, ChatCompletionRequest))
    max_tokens, max_tokens_name = _resolve_max_tokens(req, default_max_tokens)
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestLimitError("top_logprobs", "needs logprobs set to true")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        logprobs_name = "top_logprobs"
    else:
        logprobs = req.logprobs
        logprobs_name = "logprobs"
    limits.check(n=req.n, max_tokens=max_tokens, stop=req.stop, logprobs=logprobs,
                 names={"max_tokens": max_tokens_name, "logprobs": logprobs_name})
    if req.stream_options is not None and not req.stream:
        raise RequestLimitError("stream_options", "only allowed when stream is true")
    if req.prompt_logprobs is not None:
        limits.check(logprobs=req.prompt_logprobs, names={"logprobs": "prompt_logprobs"})
    kw: dict[str, Any] = {"n": req.n, "max_tokens": max_tokens, "logprobs": logprobs, "seed": req.seed,
                          "prompt_logprobs": req.prompt_logprobs}
    guided, _ = req.guided_spec()
    if guided is not None:
        kw["guided_decoding"] = guided
    bias = logit_bias_from_wire(req.logit_bias)
    if bias:
        kw["logit_bias"] = bias
    optional = {
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
        "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty, "min_tokens": req.min_tokens,
        "ignore_eos": req.ignore_eos, "stop_token_ids": req.stop_token_ids,
        "skip_special_tokens": req.skip_special_tokens,
        "include_stop_str_in_output": req.include_stop_str_in_output,
    }
    for k, v in optional.items():
        if v is not None:
            kw[k] = v   # ranges are checked (and numbers made floats) by SamplingParams
    if req.stop is not None:
        kw["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if isinstance(kw.get("min_tokens"), int) and kw["min_tokens"] > max_tokens:
        raise RequestLimitError("min_tokens", f"must be <= {max_tokens_name} ({max_tokens})")
    return kw
