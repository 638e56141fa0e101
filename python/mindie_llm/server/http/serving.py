# SPDX-License-Identifier: Apache-2.0
"""The OpenAI completion and chat-completion handlers: request -> ``AsyncLLM.generate`` -> JSON/SSE.

Owns response shapes (choices, logprobs, usage, SSE chunks), delta computation from the engine's
cumulative outputs, admission before any byte of a stream is sent, and abort on client
disconnect. Must not import torch or touch the ``LLMEngine`` directly (only ``AsyncLLM``).
"""
from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mindie_llm.sampling_params import SamplingParams
from mindie_llm.server.http.errors import error_for_exception, error_response
from mindie_llm.server.http.middleware import USAGE_STATE_KEY
from mindie_llm.server.http.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    to_sampling_kwargs,
)
from mindie_llm.server.protocol_limits import RequestLimitError, RequestLimits

__all__ = ["OpenAIServing"]

_MIN_LOGPROB = -9999.0  # JSON has no -inf


def _lp(x: float | None) -> float | None:
    if x is None:
        return None
    return x if math.isfinite(x) else _MIN_LOGPROB


def _record_usage(raw: Request | None, out: Any) -> None:
    """Token counts for the access log line."""
    if raw is not None and out is not None:
        raw.scope.setdefault("state", {})[USAGE_STATE_KEY] = (
            len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs))


class _Choice:
    """Streaming state of one sample: what has been sent so far."""

    __slots__ = ("finished", "num_logprobs", "started", "text_len")

    def __init__(self) -> None:
        self.text_len = 0
        self.num_logprobs = 0
        self.started = False
        self.finished = False


class OpenAIServing:
    def __init__(self, async_llm: Any, limits: RequestLimits, *, chat_content_special_tokens: bool = False) -> None:
        self.llm = async_llm
        self.limits = limits
        self.model_name: str = async_llm.model_name
        self.chat_content_special_tokens = chat_content_special_tokens

    async def _off_loop(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """CPU-heavy preparation (tokenizing, templates) off the event loop."""
        run = getattr(self.llm, "run_cpu", None)
        if run is None:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return await run(fn, *args, **kwargs)

    def _check_ids(self, ids: list[int], name: str) -> None:
        vocab = int(getattr(self.llm.tokenizer, "vocab_size", 0) or 0)
        if vocab:
            for i, t in enumerate(ids):
                if not 0 <= t < vocab:
                    raise RequestLimitError(f"{name}[{i}]", f"token id {t} is outside the vocabulary [0, {vocab})")

    async def _tokenize(self, text: str, name: str) -> list[int]:
        try:
            return list(await self._off_loop(self.llm.tokenizer.encode, text))
        except (ValueError, UnicodeError) as e:
            raise RequestLimitError(name, f"cannot be tokenized ({str(e).splitlines()[0][:200]})") from None

    async def _chat_ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        tok = self.llm.tokenizer
        encode_chat = getattr(tok, "encode_chat", None)

        def run() -> list[int]:
            if encode_chat is not None:
                return list(encode_chat(messages, add_generation_prompt,
                                        content_special_tokens=self.chat_content_special_tokens))
            return list(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)))

        try:
            return await self._off_loop(run)
        except ValueError as e:  # ChatTemplateError, TokenizerError: the message names the template
            raise RequestLimitError("messages", str(e).splitlines()[0][:300] or "rejected by the chat template") from None
        except Exception:  # noqa: BLE001 - a template error must read as a 400, not a 500
            raise RequestLimitError("messages", "the model's chat template rejected this conversation") from None

    # ------------------------------------------------------------------ helpers
    def _token_str(self, token_id: int, entry: Any) -> str:
        tok = getattr(entry, "decoded_token", None)
        if tok is None:
            tok = self.llm.tokenizer.decode([token_id])
        return tok

    def _top(self, entries: dict[int, Any], k: int) -> list[tuple[int, Any]]:
        ranked = sorted(entries.items(), key=lambda kv: -kv[1].logprob if math.isfinite(kv[1].logprob) else math.inf)
        return ranked[:k]

    def _completion_logprobs(self, token_ids: list[int], lps: list[dict[int, Any]], k: int,
                             offset0: int) -> dict[str, Any]:
        tokens, token_lps, tops, offsets = [], [], [], []
        off = offset0
        for tid, entries in zip(token_ids, lps):
            e = entries.get(tid)
            s = self._token_str(tid, e)
            tokens.append(s)
            token_lps.append(_lp(e.logprob) if e is not None else None)
            tops.append({self._token_str(t, v): _lp(v.logprob) for t, v in self._top(entries, k)} if k else None)
            offsets.append(off)
            off += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, token_ids: list[int], lps: list[dict[int, Any]], k: int) -> dict[str, Any]:
        content = []
        for tid, entries in zip(token_ids, lps):
            e = entries.get(tid)
            s = self._token_str(tid, e)
            top = [{"token": (ts := self._token_str(t, v)), "logprob": _lp(v.logprob),
                    "bytes": list(ts.encode("utf-8", "replace"))} for t, v in self._top(entries, k)]
            content.append({"token": s, "logprob": _lp(e.logprob) if e is not None else _MIN_LOGPROB,
                            "bytes": list(s.encode("utf-8", "replace")), "top_logprobs": top})
        return {"content": content}

    @staticmethod
    def _usage(out: Any) -> dict[str, int]:
        p = len(out.prompt_token_ids)
        c = sum(len(o.token_ids) for o in out.outputs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @staticmethod
    def _finish_reason(o: Any) -> str | None:
        return o.finish_reason

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise RequestLimitError("model", f"unknown model; this server serves {self.model_name!r}")

    async def _start(self, prompt: Any, params: SamplingParams, rid: str, priority: int
                     ) -> tuple[AsyncIterator[Any], Any]:
        """Admits the request and waits for its first output (errors surface here, before any byte)."""
        gen = self.llm.generate(prompt, params, rid, priority=priority)
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await gen.aclose()
            raise
        return gen, first

    @staticmethod
    async def _collect(gen: AsyncIterator[Any], first: Any, raw: Request) -> Any:
        """Runs ``gen`` to its end, aborting it if the client disconnects first."""
        last = first

        async def consume() -> Any:
            nonlocal last
            if last is not None and last.finished:
                return last
            async for out in gen:
                last = out
            return last

        async def disconnected() -> None:
            while True:
                message = await raw.receive()
                if message["type"] == "http.disconnect":
                    return

        task = asyncio.ensure_future(consume())
        watch = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            task.cancel()
            raise asyncio.CancelledError()
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
            # The generator must not be running in ``task`` when it is closed here.
            await asyncio.gather(task, watch, return_exceptions=True)
            await gen.aclose()

    @staticmethod
    def _sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    async def _run(self, req: Any, raw: Request, prompt: Any, kind: str) -> Response:
        default_max_tokens = min(16, self.limits.max_tokens_limit)  # OpenAI's completion default
        if kind == "chat" and req.max_tokens is None and req.max_completion_tokens is None:
            # As OpenAI: without a cap, a chat reply may use the rest of the context window.
            room = self.llm.max_model_len - len(prompt)   # chat prompts arrive as token ids
            default_max_tokens = max(1, min(self.limits.max_tokens_limit, room))
        kw = to_sampling_kwargs(req, self.limits, default_max_tokens=default_max_tokens)
        params = SamplingParams(**kw)
        rid = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        try:
            gen, first = await self._start(prompt, params, rid, req.priority)
        except (ValueError, RuntimeError) as e:
            status, msg, param, code = error_for_exception(e)
            return error_response(status, msg, param, code)
        created = int(time.time())
        k = int(kw.get("logprobs") or 0)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = self._stream(gen, first, rid, created, kind, k, include_usage, params.logprobs is not None, raw)
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        try:
            last = await self._collect(gen, first, raw)
        except asyncio.CancelledError:
            return Response(status_code=499)
        except (ValueError, RuntimeError) as e:
            status, msg, param, code = error_for_exception(e)
            return error_response(status, msg, param, code)
        _record_usage(raw, last)
        return JSONResponse(self._final(last, rid, created, kind, k, params.logprobs is not None))

    def _final(self, out: Any, rid: str, created: int, kind: str, k: int, want_lp: bool) -> dict[str, Any]:
        choices = []
        for o in sorted(out.outputs, key=lambda o: o.index):
            if kind == "completion":
                lp = (self._completion_logprobs(o.token_ids, o.logprobs, k, 0) if want_lp and o.logprobs is not None
                      else None)
                choices.append({"index": o.index, "text": o.text, "logprobs": lp,
                                "finish_reason": self._finish_reason(o)})
            else:
                lp = self._chat_logprobs(o.token_ids, o.logprobs, k) if want_lp and o.logprobs is not None else None
                choices.append({"index": o.index, "message": {"role": "assistant", "content": o.text},
                                "logprobs": lp, "finish_reason": self._finish_reason(o)})
        return {"id": rid, "object": "text_completion" if kind == "completion" else "chat.completion",
                "created": created, "model": self.model_name, "choices": choices, "usage": self._usage(out)}

    async def _stream(self, gen: AsyncIterator[Any], first: Any, rid: str, created: int, kind: str, k: int,
                      include_usage: bool, want_lp: bool, raw: Request | None = None) -> AsyncIterator[str]:
        obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
        state: dict[int, _Choice] = {}
        last = first

        def chunks(out: Any) -> list[str]:
            res = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                st = state.setdefault(o.index, _Choice())
                if st.finished:
                    continue
                delta_text = o.text[st.text_len:]
                new_ids = o.token_ids[st.num_logprobs:]
                new_lps = o.logprobs[st.num_logprobs:] if (want_lp and o.logprobs is not None) else None
                done = o.finish_reason is not None
                if not delta_text and not done and not (kind == "chat" and not st.started) and not new_lps:
                    continue
                if kind == "completion":
                    lp = self._completion_logprobs(new_ids, new_lps, k, st.text_len) if new_lps else None
                    choice = {"index": o.index, "text": delta_text, "logprobs": lp,
                              "finish_reason": o.finish_reason if done else None}
                else:
                    delta: dict[str, Any] = {"content": delta_text}
                    if not st.started:
                        delta["role"] = "assistant"
                    lp = self._chat_logprobs(new_ids, new_lps, k) if new_lps else None
                    choice = {"index": o.index, "delta": delta, "logprobs": lp,
                              "finish_reason": o.finish_reason if done else None}
                st.started = True
                st.text_len = len(o.text)
                st.num_logprobs = len(o.token_ids)
                st.finished = done
                chunk = {"id": rid, "object": obj, "created": created, "model": self.model_name,
                         "choices": [choice]}
                if include_usage:
                    chunk["usage"] = None
                res.append(self._sse(chunk))
            return res

        try:
            if first is not None:
                for c in chunks(first):
                    yield c
            if first is None or not first.finished:
                async for out in gen:
                    last = out
                    for c in chunks(out):
                        yield c
            if include_usage and last is not None:
                yield self._sse({"id": rid, "object": obj, "created": created, "model": self.model_name,
                                 "choices": [], "usage": self._usage(last)})
            _record_usage(raw, last)
            yield "data: [DONE]\n\n"
        except (ValueError, RuntimeError) as e:
            _, msg, param, code = error_for_exception(e)
            yield self._sse({"error": {"message": msg, "type": "server_error", "param": param, "code": code}})
            yield "data: [DONE]\n\n"
        finally:
            await gen.aclose()

    # ------------------------------------------------------------------ routes
    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        self._check_model(req.model)
        prompt: Any = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise RequestLimitError("prompt", "a list of strings must hold exactly one prompt")
            prompt = prompt[0]
        if (isinstance(prompt, str) and not prompt) or (isinstance(prompt, list) and not prompt):
            raise RequestLimitError("prompt", "must not be empty")
        if isinstance(prompt, str):
            prompt = await self._tokenize(prompt, "prompt")
        else:
            self._check_ids(prompt, "prompt")
        return await self._run(req, raw, prompt, "completion")

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        self._check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        prompt = await self._chat_ids(messages, req.add_generation_prompt)
        if not prompt:
            raise RequestLimitError("messages", "the conversation renders to an empty prompt")
        return await self._run(req, raw, prompt, "chat")
