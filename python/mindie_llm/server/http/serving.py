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
from mindie_llm.server.http.tools import (
    ToolPlan,
    may_be_tool_call,
    plan_tools,
    prompt_messages,
    tool_call_objects,
    tool_calls_of,
)
from mindie_llm.server.http.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    to_sampling_kwargs,
)
from mindie_llm.server.protocol_limits import ModelNotFoundError, RequestLimitError, RequestLimits

__all__ = ["OpenAIServing"]

_MIN_LOGPROB = -9999.0  # JSON has no -inf
_MAX_PROMPTS = 64       # prompts in one completions request (each is admitted as its own request)



def _lp(x: float | None) -> float | None:
    if x is None:
        return None
    return x if math.isfinite(x) else _MIN_LOGPROB


def _record_usage(raw: Request | None, out: Any, counts: tuple[int, int] | None = None) -> None:
    """Token counts for the access log line."""
    if raw is None:
        return
    if counts is None and out is not None:
        counts = (len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs))
    if counts is not None:
        raw.scope.setdefault("state", {})[USAGE_STATE_KEY] = counts


class _Choice:
    """Streaming state of one sample: what has been sent so far."""

    __slots__ = ("finished", "held", "num_logprobs", "started", "text_len")

    def __init__(self) -> None:
        self.text_len = 0
        self.num_logprobs = 0
        self.started = False
        self.finished = False
        self.held = False      # tools: text held back while it may still be a tool call


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

    async def _check_guided(self, spec: dict, wire: str | None) -> None:
        """Compiles a structured-output spec off the event loop (the engine then finds it cached);
        a bad one is a 400 naming the wire field."""
        so = getattr(getattr(self.llm, "engine", None), "structured_output", None)
        if so is None:
            raise RequestLimitError(wire or "guided_decoding", "structured output is not available on this engine")
        try:
            await self._off_loop(so.compile, spec)
        except ValueError as e:
            raise RequestLimitError(wire or "guided_decoding", str(e).partition(": ")[2][:300] or str(e)) from None

    def _check_ids(self, ids: list[int], name: str) -> None:
        vocab = int(getattr(self.llm.tokenizer, "vocab_size", 0) or 0)
        if vocab:
            for i, t in enumerate(ids):
                if not 0 <= t < vocab:
                    raise RequestLimitError(f"{name}[{i}]", f"token id {t} is outside the vocabulary [0, {vocab})")

    def _tokenizer(self, name: str) -> Any:
        tok = self.llm.tokenizer
        if tok is None or not hasattr(tok, "encode"):
            raise RequestLimitError(name, "the model has no tokenizer (no tokenizer.json beside the weights): "
                                    "send token ids, or set model.tokenizer")
        return tok

    async def _tokenize(self, text: str, name: str) -> list[int]:
        self._tokenizer(name)
        try:
            return list(await self._off_loop(self.llm.tokenizer.encode, text))
        except (ValueError, UnicodeError) as e:
            raise RequestLimitError(name, f"cannot be tokenized ({str(e).splitlines()[0][:200]})") from None

    async def _chat_ids(self, messages: list[dict], add_generation_prompt: bool, **template_vars: Any) -> list[int]:
        tok = self._tokenizer("messages")
        encode_chat = getattr(tok, "encode_chat", None)

        def run() -> list[int]:
            if encode_chat is not None:
                return list(encode_chat(messages, add_generation_prompt,
                                        content_special_tokens=self.chat_content_special_tokens, **template_vars))
            return list(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                           **template_vars)))

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
            raise ModelNotFoundError(model, self.model_name)

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
    async def _collect(streams: list[tuple[AsyncIterator[Any], Any]], raw: Request) -> list[Any]:
        """Runs every generator to its end, aborting them all if the client disconnects first."""
        async def consume(gen: AsyncIterator[Any], last: Any) -> Any:
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

        task = asyncio.ensure_future(asyncio.gather(*(consume(g, f) for g, f in streams)))
        watch = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return list(task.result())
            task.cancel()
            raise asyncio.CancelledError()
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
            # The generators must not be running in ``task`` when they are closed here.
            await asyncio.gather(task, watch, return_exceptions=True)
            for gen, _ in streams:
                await gen.aclose()

    @staticmethod
    def _sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    def _prompt_logprobs(self, out: Any) -> list[Any] | None:
        lps = getattr(out, "prompt_logprobs", None)
        if lps is None:
            return None
        return [None if e is None else
                {str(t): {"logprob": _lp(v.logprob), "rank": v.rank, "decoded_token": self._token_str(t, v)}
                 for t, v in e.items()} for e in lps]

    async def _run(self, req: Any, raw: Request, prompts: list[list[int]], kind: str,
                   echo_texts: list[str] | None = None, plan: ToolPlan | None = None) -> Response:
        default_max_tokens = min(16, self.limits.max_tokens_limit)  # OpenAI's completion default
        if kind == "chat" and req.max_tokens is None and req.max_completion_tokens is None:
            # As OpenAI: without a cap, a chat reply may use the rest of the context window.
            room = self.llm.max_model_len - len(prompts[0])   # prompts arrive as token ids
            default_max_tokens = max(1, min(self.limits.max_tokens_limit, room))
        kw = to_sampling_kwargs(req, self.limits, default_max_tokens=default_max_tokens)
        best_of = getattr(req, "best_of", None)
        want_lp = kw.get("logprobs") is not None
        if best_of is not None and best_of != req.n:
            if best_of < req.n:
                raise RequestLimitError("best_of", f"must be >= n ({req.n}); got {best_of}")
            if req.stream:
                raise RequestLimitError("best_of", "cannot be used with stream (as OpenAI)")
            self.limits.check(n=best_of, names={"n": "best_of"})
            kw["n"] = best_of   # ranked by cumulative logprob below, which needs logprobs computed
            kw["logprobs"] = kw.get("logprobs") or 0
        if echo_texts is not None and want_lp:
            raise RequestLimitError("echo", "not supported together with logprobs")
        if plan is not None and plan.guided is not None:
            if kw.get("guided_decoding") is not None:
                raise RequestLimitError("tool_choice", f"{plan.mode} tool choice conflicts with {req.guided_spec()[1]}")
            kw["guided_decoding"] = plan.guided
        params = SamplingParams(**kw)
        if params.guided_decoding is not None:
            await self._check_guided(params.guided_decoding,
                                     "tools" if plan is not None and plan.guided is not None else req.guided_spec()[1])
        rid = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        streams: list[tuple[AsyncIterator[Any], Any]] = []
        try:
            for i, prompt in enumerate(prompts):
                streams.append(await self._start(prompt, params, rid if len(prompts) == 1 else f"{rid}-{i}",
                                                 req.priority))
        except (ValueError, RuntimeError) as e:
            for gen, _ in streams:
                await gen.aclose()
            status, msg, param, code = error_for_exception(e)
            if len(prompts) > 1 and param == "prompt":
                msg = f"prompt[{len(streams)}]: {msg.partition(': ')[2] or msg}"
                param = f"prompt[{len(streams)}]"
            return error_response(status, msg, param, code)
        created = int(time.time())
        k = int(kw.get("logprobs") or 0)
        if req.stream:
            opts = req.stream_options
            usage_mode = ("continuous" if opts and opts.include_usage and opts.continuous_usage_stats else
                          "final" if opts and opts.include_usage else None)
            body = self._stream(streams, rid, created, kind, k, usage_mode, want_lp, raw, params.n, echo_texts, plan)
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        try:
            lasts = await self._collect(streams, raw)
        except asyncio.CancelledError:
            return Response(status_code=499)
        except (ValueError, RuntimeError) as e:
            status, msg, param, code = error_for_exception(e)
            return error_response(status, msg, param, code)
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        choices: list[dict[str, Any]] = []
        for i, last in enumerate(lasts):
            outs = sorted(last.outputs, key=lambda o: o.index)
            if best_of is not None and best_of != req.n:
                outs = sorted(outs, key=lambda o: -(o.cumulative_logprob or 0.0))[:req.n]
            for j, o in enumerate(outs):
                choices.append(self._choice(o, i * req.n + j, kind, k, want_lp,
                                            echo_texts[i] if echo_texts else "", last, plan))
            for key, v in self._usage(last).items():
                usage[key] += v
        _record_usage(raw, None, (usage["prompt_tokens"], usage["completion_tokens"]))
        return JSONResponse({"id": rid, "object": "text_completion" if kind == "completion" else "chat.completion",
                             "created": created, "model": self.model_name, "choices": choices, "usage": usage,
                             **({"prompt_logprobs": self._prompt_logprobs(lasts[0])}
                                if kind == "chat" and params.prompt_logprobs is not None else {})})

    def _choice(self, o: Any, index: int, kind: str, k: int, want_lp: bool, echo: str, out: Any,
                plan: ToolPlan | None = None) -> dict[str, Any]:
        if kind == "completion":
            lp = self._completion_logprobs(o.token_ids, o.logprobs, k, 0) if want_lp and o.logprobs is not None else None
            choice = {"index": index, "text": echo + o.text, "logprobs": lp, "finish_reason": self._finish_reason(o)}
            if getattr(out, "prompt_logprobs", None) is not None:
                choice["prompt_logprobs"] = self._prompt_logprobs(out)
            return choice
        lp = self._chat_logprobs(o.token_ids, o.logprobs, k) if want_lp and o.logprobs is not None else None
        message: dict[str, Any] = {"role": "assistant", "content": o.text}
        finish = self._finish_reason(o)
        if plan is not None and plan.active:
            content, calls = tool_calls_of(o.text, plan)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": tool_call_objects(calls)}
                finish = "tool_calls" if finish == "stop" else finish
        return {"index": index, "message": message, "logprobs": lp, "finish_reason": finish}

    async def _merged(self, streams: list[tuple[AsyncIterator[Any], Any]]) -> AsyncIterator[tuple[int, Any]]:
        """(prompt index, cumulative output) from every stream as they come; errors propagate."""
        if len(streams) == 1:
            gen, first = streams[0]
            if first is not None:
                yield 0, first
            if first is None or not first.finished:
                async for out in gen:
                    yield 0, out
            return
        q: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, gen: AsyncIterator[Any], first: Any) -> None:
            try:
                if first is not None:
                    await q.put((i, first))
                if first is None or not first.finished:
                    async for out in gen:
                        await q.put((i, out))
                await q.put((i, done))
            except Exception as e:  # noqa: BLE001 - re-raised on the consumer side
                await q.put((i, e))

        tasks = [asyncio.ensure_future(pump(i, g, f)) for i, (g, f) in enumerate(streams)]
        try:
            left = len(tasks)
            while left:
                i, item = await q.get()
                if item is done:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream(self, streams: list[tuple[AsyncIterator[Any], Any]], rid: str, created: int, kind: str,
                      k: int, usage_mode: str | None, want_lp: bool, raw: Request | None, n: int,
                      echo_texts: list[str] | None, plan: ToolPlan | None = None) -> AsyncIterator[str]:
        obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
        state: dict[int, _Choice] = {}
        lasts: dict[int, Any] = {}
        tools = kind == "chat" and plan is not None and plan.active

        def usage_now() -> dict[str, int]:
            p = sum(len(o.prompt_token_ids) for o in lasts.values())
            c = sum(len(x.token_ids) for o in lasts.values() for x in o.outputs)
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        def chunks(pi: int, out: Any) -> list[str]:
            res = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                index = pi * n + o.index
                st = state.setdefault(index, _Choice())
                if st.finished:
                    continue
                delta_text = o.text[st.text_len:]
                new_ids = o.token_ids[st.num_logprobs:]
                new_lps = o.logprobs[st.num_logprobs:] if (want_lp and o.logprobs is not None) else None
                done = o.finish_reason is not None
                needs_first = not st.started and (kind == "chat" or bool(echo_texts))
                if not delta_text and not done and not needs_first and not new_lps:
                    continue
                if kind == "completion":
                    lp = self._completion_logprobs(new_ids, new_lps, k, st.text_len) if new_lps else None
                    prefix = echo_texts[pi] if (echo_texts and not st.started) else ""
                    choice = {"index": index, "text": prefix + delta_text, "logprobs": lp,
                              "finish_reason": o.finish_reason if done else None}
                else:
                    finish = o.finish_reason if done else None
                    if tools:
                        # required / named: the reply is the call; auto: held while it may become one.
                        hold = plan.mode in ("required", "named") or may_be_tool_call(o.text)
                        if hold and not done:
                            st.held = True
                            if st.started:
                                continue
                            delta_text = ""
                        elif st.held and not done:
                            delta_text, st.held = o.text, False     # not a call after all: send what was held
                        elif done and (st.held or plan.mode in ("required", "named")):
                            content, calls = tool_calls_of(o.text, plan)
                            if calls:
                                st.started, st.finished = True, True
                                delta = {"tool_calls": tool_call_objects(calls, stream=True)}
                                if content:
                                    delta["content"] = content
                                res.append(self._sse({"id": rid, "object": obj, "created": created,
                                                      "model": self.model_name, "choices": [{
                                                          "index": index, "delta": delta, "logprobs": None,
                                                          "finish_reason": "tool_calls" if finish == "stop" else finish}]}))
                                continue
                            delta_text = o.text
                    delta: dict[str, Any] = {"content": delta_text}
                    if not st.started:
                        delta["role"] = "assistant"
                    lp = self._chat_logprobs(new_ids, new_lps, k) if new_lps else None
                    choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
                st.started = True
                st.text_len = len(o.text)
                st.num_logprobs = len(o.token_ids)
                st.finished = done
                chunk = {"id": rid, "object": obj, "created": created, "model": self.model_name,
                         "choices": [choice]}
                if usage_mode == "final":
                    chunk["usage"] = None
                elif usage_mode == "continuous":
                    chunk["usage"] = usage_now()
                res.append(self._sse(chunk))
            return res

        try:
            async for pi, out in self._merged(streams):
                lasts[pi] = out
                for c in chunks(pi, out):
                    yield c
            if usage_mode is not None and lasts:
                yield self._sse({"id": rid, "object": obj, "created": created, "model": self.model_name,
                                 "choices": [], "usage": usage_now()})
            if lasts:
                u = usage_now()
                _record_usage(raw, None, (u["prompt_tokens"], u["completion_tokens"]))
            yield "data: [DONE]\n\n"
        except (ValueError, RuntimeError) as e:
            _, msg, param, code = error_for_exception(e)
            yield self._sse({"error": {"message": msg, "type": "server_error", "param": param, "code": code}})
            yield "data: [DONE]\n\n"
        finally:
            for gen, _ in streams:
                await gen.aclose()

    # ------------------------------------------------------------------ tokenizer routes (vLLM)
    async def tokenize(self, req: TokenizeRequest) -> Response:
        if req.model is not None:
            self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise RequestLimitError("prompt", "send exactly one of prompt and messages")
        tok = self._tokenizer("prompt")
        if req.messages is not None:
            ids = await self._chat_ids([{"role": m.role, "content": m.text()} for m in req.messages],
                                       req.add_generation_prompt)
        else:
            try:
                ids = list(await self._off_loop(tok.encode, req.prompt, req.add_special_tokens))
            except (ValueError, TypeError):
                ids = await self._tokenize(req.prompt, "prompt")
        return JSONResponse({"count": len(ids), "max_model_len": self.llm.max_model_len, "tokens": ids})

    async def detokenize(self, req: DetokenizeRequest) -> Response:
        if req.model is not None:
            self._check_model(req.model)
        self._check_ids(req.tokens, "tokens")
        text = await self._off_loop(self.llm.tokenizer.decode, list(req.tokens))
        return JSONResponse({"prompt": text})

    # ------------------------------------------------------------------ routes
    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        self._check_model(req.model)
        raw_prompts: list[Any]
        if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)):
            raw_prompts = [req.prompt]
        else:
            raw_prompts = list(req.prompt)
        if not raw_prompts:
            raise RequestLimitError("prompt", "must not be empty")
        if len(raw_prompts) > _MAX_PROMPTS:
            raise RequestLimitError("prompt", f"at most {_MAX_PROMPTS} prompts in one request; got {len(raw_prompts)}")
        prompts, echo = [], []
        for i, p in enumerate(raw_prompts):
            name = "prompt" if len(raw_prompts) == 1 else f"prompt[{i}]"
            if not p:
                raise RequestLimitError(name, "must not be empty")
            if isinstance(p, str):
                prompts.append(await self._tokenize(p, name))
                echo.append(p)
            else:
                self._check_ids(list(p), name)
                prompts.append(list(p))
                echo.append(self.llm.tokenizer.decode(list(p)) if req.echo else "")
        return await self._run(req, raw, prompts, "completion", echo if req.echo else None)

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        self._check_model(req.model)
        req.check_supported(chat=True)   # before the template: nothing is ignored silently
        plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
        messages = [m.as_dict() for m in req.messages]
        messages, template_vars = prompt_messages(messages, plan, getattr(self.llm.tokenizer, "chat_template", None))
        prompt = await self._chat_ids(messages, req.add_generation_prompt, **template_vars)
        if not prompt:
            raise RequestLimitError("messages", "the conversation renders to an empty prompt")
        return await self._run(req, raw, [prompt], "chat", plan=plan)
