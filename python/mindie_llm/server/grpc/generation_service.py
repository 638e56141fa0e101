# SPDX-License-Identifier: Apache-2.0
"""The native ``mindie.v1.GenerationService``: Generate, GenerateStream, Tokenize, Detokenize,
ModelInfo over an ``AsyncLLM``.

Owns the mapping between the mindie.v1 messages and ``SamplingParams`` / ``RequestOutput``
(field names in errors are the proto's, e.g. ``sampling.max_tokens``). Validation and admission
happen before the first stream message, so a full queue is RESOURCE_EXHAUSTED with no partial
stream. A cancelled RPC closes the AsyncLLM generator, which aborts the request.

Must not import torch or the model code; talks to the engine only through AsyncLLM.
"""
from __future__ import annotations

import logging
import math
from typing import Any, AsyncIterator

import grpc

from mindie_llm.sampling_params import SamplingParams
from mindie_llm.server.grpc.common import DeltaTracker, load_stubs, new_request_id, off_loop, timings_ns
from mindie_llm.server.grpc.errors import RpcError, abort_with, last_output
from mindie_llm.server.protocol_limits import RequestLimits

__all__ = ["GenerationServicer", "SERVICE_NAME"]

logger = logging.getLogger(__name__)

pb2, pb2_grpc = load_stubs("mindie_generation")
SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name

_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_INT64_MAX = (1 << 63) - 1
_FINISH = {"stop": pb2.FINISH_REASON_STOP, "length": pb2.FINISH_REASON_LENGTH, "abort": pb2.FINISH_REASON_ABORT}

# proto field -> SamplingParams field, for fields whose presence is tracked (proto3 optional).
_OPTIONAL_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "seed",
                    "logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
                    "skip_special_tokens")


def _finite(name: str, value: float) -> float:
    if math.isnan(value) or math.isinf(value):
        raise RpcError(_INVALID, f"sampling.{name}: must be a finite number; got {value}")
    return value


def _guided_from_proto(g: Any) -> dict[str, Any]:
    """SamplingParams.guided_decoding of a GuidedDecoding message (RpcError naming the field)."""
    import json

    which = g.WhichOneof("kind")
    if which is None:
        raise RpcError(_INVALID, "sampling.guided: set one of json_schema, json_object, regex, choice, grammar")
    if which == "json_schema":
        try:
            return {"json": json.loads(g.json_schema)}
        except ValueError:
            raise RpcError(_INVALID, "sampling.guided.json_schema: not valid JSON") from None
    if which == "json_object":
        if not g.json_object:
            raise RpcError(_INVALID, "sampling.guided.json_object: must be true when set")
        return {"json_object": True}
    if which == "choice":
        return {"choice": list(g.choice.choices)}
    return {which: getattr(g, which)}


def sampling_params_from_proto(msg: Any, limits: RequestLimits, has_sampling: bool) -> SamplingParams:
    """Builds SamplingParams from a ``SamplingParameters`` message, checking the server caps.

    Raises RpcError(INVALID_ARGUMENT) naming ``sampling.<field>``.
    """
    kwargs: dict[str, Any] = {}
    if has_sampling:
        for name in _OPTIONAL_FIELDS:
            if msg.HasField(name):
                value = getattr(msg, name)
                kwargs[name] = _finite(name, value) if isinstance(value, float) else value
        if msg.stop:
            kwargs["stop"] = list(msg.stop)
        if msg.stop_token_ids:
            kwargs["stop_token_ids"] = list(msg.stop_token_ids)
        kwargs["ignore_eos"] = msg.ignore_eos
        kwargs["include_stop_str_in_output"] = msg.include_stop_str_in_output
        if msg.HasField("guided"):
            kwargs["guided_decoding"] = _guided_from_proto(msg.guided)
        if msg.logit_bias:
            kwargs["logit_bias"] = dict(msg.logit_bias)   # ranges and cap: SamplingParams; vocabulary: below
    try:
        limits.check(n=kwargs.get("n"), max_tokens=kwargs.get("max_tokens"), stop=kwargs.get("stop"),
                     logprobs=kwargs.get("logprobs"))
        if "max_tokens" not in kwargs:
            kwargs["max_tokens"] = min(16, limits.max_tokens_limit)
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise RpcError(_INVALID, f"sampling.{e}") from None


def _logprobs_to_proto(entries: list[dict[int, Any]] | None, token_ids: list[int], tokenizer: Any,
                       num_top: int) -> list[Any]:
    """One TokenLogprob per generated token: the sampled token's logprob plus the ``num_top`` most
    likely ones (the engine's entry also holds the sampled token when it ranks lower)."""
    if entries is None:
        return []
    result = []
    for tok, entry in zip(token_ids, entries):
        chosen = entry.get(tok)
        tops = sorted(((tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= num_top),
                      key=lambda kv: kv[1].rank)
        result.append(pb2.TokenLogprob(
            token_id=tok,
            token=_token_text(chosen, tok, tokenizer),
            logprob=chosen.logprob if chosen is not None else -math.inf,
            top_logprobs=[pb2.TopLogprob(token_id=tid, token=_token_text(lp, tid, tokenizer), logprob=lp.logprob)
                          for tid, lp in tops],
        ))
    return result


def _token_text(lp: Any, token_id: int, tokenizer: Any) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    try:
        return tokenizer.decode([token_id], skip_special_tokens=False)
    except Exception:  # noqa: BLE001 - a display string only
        return ""


def _set_stop_reason(msg: Any, reason: str | int | None) -> None:
    if isinstance(reason, str):
        msg.stop_string = reason
    elif isinstance(reason, int) and not isinstance(reason, bool):
        msg.stop_token_id = reason


class GenerationServicer(pb2_grpc.GenerationServiceServicer):
    """mindie.v1.GenerationService over one AsyncLLM."""

    def __init__(self, async_llm: Any, config: Any):
        self.llm = async_llm
        self.config = config
        self.limits = RequestLimits.from_config(config)

    # ------------------------------------------------------------------ helpers
    def _check_model(self, model: str, field: str = "model") -> None:
        if model and model != self.llm.model_name:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"{field}: unknown model {model[:128]!r}; "
                           f"this server serves {self.llm.model_name!r}")

    def _prepare(self, request: Any) -> tuple[Any, SamplingParams]:
        """Validates a GenerateRequest: (prompt, params). Raises RpcError / ValueError."""
        self._check_model(request.model)
        which = request.WhichOneof("prompt")
        if which is None:
            raise RpcError(_INVALID, "prompt: set either text or token_ids")
        if which == "text":
            if not request.text:
                raise RpcError(_INVALID, "text: the prompt must not be empty")
            prompt: Any = request.text
        else:
            ids = list(request.token_ids.ids)
            if not ids:
                raise RpcError(_INVALID, "token_ids: the prompt must not be empty")
            vocab = int(getattr(self.llm.tokenizer, "vocab_size", _INT64_MAX))
            bad = next((i for i in ids if not 0 <= i < vocab), None)
            if bad is not None:
                raise RpcError(_INVALID, f"token_ids: {bad} is outside the vocabulary [0, {vocab})")
            prompt = ids
        if not -(1 << 31) <= request.priority < (1 << 31):
            raise RpcError(_INVALID, f"priority: must fit in int32; got {request.priority}")
        params = sampling_params_from_proto(request.sampling, self.limits, request.HasField("sampling"))
        vocab = int(getattr(self.llm.tokenizer, "vocab_size", _INT64_MAX))
        bad = next((i for i in params.stop_token_ids or () if i >= vocab), None)
        if bad is not None:
            raise RpcError(_INVALID, f"sampling.stop_token_ids: {bad} is outside the vocabulary [0, {vocab})")
        bad = next((i for i in params.logit_bias or () if i >= vocab), None)
        if bad is not None:
            raise RpcError(_INVALID, f"sampling.logit_bias: token id {bad} is outside the vocabulary [0, {vocab})")
        return prompt, params

    async def _check_guided(self, spec: dict) -> None:
        """Compiles a structured-output spec off the event loop; INVALID_ARGUMENT when it cannot match."""
        so = getattr(getattr(self.llm, "engine", None), "structured_output", None)
        if so is None:
            raise RpcError(_INVALID, "sampling.guided: structured output is not available on this engine")
        try:
            await off_loop(self.llm, so.compile, spec)
        except ValueError as e:
            msg = str(e).partition(": ")[2] or str(e)
            raise RpcError(_INVALID, f"sampling.guided.{getattr(e, 'key', 'spec')}: {msg[:300]}") from None

    async def _start(self, request: Any, context: grpc.aio.ServicerContext) -> tuple[AsyncIterator[Any], Any]:
        """Validates and admits a request; returns (generator, first output). Aborts the RPC on error."""
        try:
            prompt, params = self._prepare(request)
            if params.guided_decoding is not None:
                await self._check_guided(params.guided_decoding)
            if isinstance(prompt, str):
                prompt = list(await off_loop(self.llm, self.llm.tokenizer.encode, prompt))
            gen = self.llm.generate(prompt, params, new_request_id(), priority=int(request.priority))
        except Exception as e:  # noqa: BLE001 - mapped to a status code
            await abort_with(context, e)
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            await abort_with(context, RpcError(grpc.StatusCode.INTERNAL, "the request ended without output"))
        except Exception as e:  # noqa: BLE001 - admission errors: ValueError, QueueFull, Draining...
            await gen.aclose()
            await abort_with(context, e)
        return gen, first

    @staticmethod
    def _usage(out: Any) -> Any:
        return pb2.Usage(prompt_tokens=len(out.prompt_token_ids),
                         completion_tokens=sum(len(o.token_ids) for o in out.outputs),
                         cached_prompt_tokens=int(getattr(out.metrics, "num_cached_tokens", 0) or 0))

    # ------------------------------------------------------------------ RPCs
    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        gen, last = await self._start(request, context)
        last = await last_output(gen, context, last)
        completions = []
        for o in sorted(last.outputs, key=lambda o: o.index):
            c = pb2.Completion(index=o.index, text=o.text, token_ids=o.token_ids,
                               finish_reason=_FINISH.get(o.finish_reason or "", pb2.FINISH_REASON_UNSPECIFIED),
                               logprobs=_logprobs_to_proto(o.logprobs, o.token_ids, self.llm.tokenizer,
                                                           request.sampling.logprobs))
            _set_stop_reason(c, o.stop_reason)
            if o.cumulative_logprob is not None and o.logprobs is not None:
                c.cumulative_logprob = o.cumulative_logprob
            completions.append(c)
        return pb2.GenerateResponse(request_id=request.request_id, model=self.llm.model_name,
                                    completions=completions, usage=self._usage(last),
                                    timings=pb2.Timings(**timings_ns(last.metrics)),
                                    prompt_token_ids=last.prompt_token_ids)

    async def GenerateStream(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        gen, first = await self._start(request, context)
        tracker = DeltaTracker()
        try:
            out = first
            while True:
                deltas = tracker.deltas(out.outputs)
                for i, d in enumerate(deltas):
                    msg = pb2.GenerateStreamResponse(
                        request_id=request.request_id, index=d.index, text=d.text, token_ids=d.token_ids,
                        logprobs=_logprobs_to_proto(d.logprobs, d.token_ids, self.llm.tokenizer,
                                                     request.sampling.logprobs),
                        finish_reason=_FINISH.get(d.finish_reason or "", pb2.FINISH_REASON_UNSPECIFIED))
                    _set_stop_reason(msg, d.stop_reason)
                    if out.finished and i == len(deltas) - 1:
                        msg.finished = True
                        msg.usage.CopyFrom(self._usage(out))
                        msg.timings.CopyFrom(pb2.Timings(**timings_ns(out.metrics)))
                    yield msg
                if out.finished:
                    if not deltas:  # every sample had already sent its last delta
                        yield pb2.GenerateStreamResponse(request_id=request.request_id, finished=True,
                                                         usage=self._usage(out),
                                                         timings=pb2.Timings(**timings_ns(out.metrics)))
                    return
                try:
                    out = await gen.__anext__()
                except StopAsyncIteration:
                    return
                except Exception as e:  # noqa: BLE001
                    await abort_with(context, e, admitted=True)
        finally:
            await gen.aclose()  # aborts the request if the client went away

    async def Tokenize(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._check_model(request.model)
            if not request.text:
                raise RpcError(_INVALID, "text: must not be empty")
            if len(request.text) > self.limits.max_request_body_bytes:
                raise RpcError(_INVALID, "text: longer than server.max_request_body_bytes")
            tok = self.llm.tokenizer
            ids = [int(i) for i in await off_loop(self.llm, tok.encode, request.text)]
            tokens = [t if isinstance(t, str) else "" for t in tok.convert_ids_to_tokens(ids)]
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)
        return pb2.TokenizeResponse(token_ids=ids, tokens=tokens)

    async def Detokenize(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._check_model(request.model)
            tok = self.llm.tokenizer
            ids = list(request.token_ids)
            vocab = int(tok.vocab_size)
            bad = next((i for i in ids if not 0 <= i < vocab), None)
            if bad is not None:
                raise RpcError(_INVALID, f"token_ids: {bad} is outside the vocabulary [0, {vocab})")
            skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
            text = tok.decode(ids, skip_special_tokens=skip)
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)
        return pb2.DetokenizeResponse(text=text)

    async def ModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._check_model(request.model)
        except RpcError as e:
            await abort_with(context, e)
        cfg = self.config
        stats = self.llm.get_stats()
        tok = self.llm.tokenizer
        from mindie_llm import __version__

        return pb2.ModelInfoResponse(
            model=self.llm.model_name, max_model_len=self.llm.max_model_len, block_size=self.llm.block_size,
            num_kv_blocks=int(getattr(stats, "num_kv_blocks", 0) or 0),
            vocab_size=int(getattr(tok, "vocab_size", 0) or 0),
            eos_token_ids=[int(i) for i in (getattr(tok, "eos_token_ids", None) or [])],
            max_n=cfg.scheduler.max_n, max_tokens_limit=cfg.server.max_tokens_limit,
            max_logprobs=cfg.server.max_logprobs, max_stop_strings=cfg.server.max_stop_strings,
            max_batch_size=cfg.scheduler.max_batch_size, max_prefill_tokens=cfg.scheduler.max_prefill_tokens,
            max_queued_requests=cfg.scheduler.max_queued_requests,
            capabilities=pb2.Capabilities(chunked_prefill=cfg.scheduler.enable_chunked_prefill,
                                          prefix_caching=cfg.cache.enable_prefix_caching,
                                          streaming=True, logprobs=cfg.server.max_logprobs > 0),
            server_version=__version__, device=cfg.backend.device,
            num_free_kv_blocks=int(getattr(stats, "num_free_kv_blocks", 0) or 0))
