# SPDX-License-Identifier: Apache-2.0
"""LLMEngine: the synchronous engine loop over the C++ scheduler and the executor.

    step():  out = scheduler.schedule(); out.new_requests = the requests workers have not seen
             ->  res = executor.execute(out)        (every worker, only the step message)
             ->  scheduler.update(res)              (tokens per request, CSR)
             ->  detokenize, stop strings (scheduler.finish(id, STOP_STRING)), RequestOutputs

Owns request validation (every bad input is a ValueError naming the field, raised before anything
is scheduled), the mapping of external string ids to the scheduler's int64 ids, ``n > 1`` fan-out
(children share the prompt's KV blocks through ``parent_id``) and per-request fault isolation: an
exception while processing one request's output aborts that request only.

Single-threaded: call every method from one thread. Must not import the server.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from mindie_llm.config import EngineConfig
from mindie_llm.engine.detokenizer import IncrementalDetokenizer
from mindie_llm.engine.request import FINISH_REASON_NAMES, RequestGroup, Sample
from mindie_llm.engine.structured_output import GuidedDecodingError, StructuredOutputManager
from mindie_llm.contract import FinishReason, ModelRunnerOutput
from mindie_llm.engine.new_requests import NewRequestTable
from mindie_llm.outputs import EngineStats, Logprob, RequestMetrics, RequestOutput
from mindie_llm.sampling_params import SamplingParams

__all__ = ["LLMEngine", "EngineStats", "InvalidRequestError"]

logger = logging.getLogger(__name__)

_EOS, _STOP_TOKEN, _STOP_STRING = FinishReason.EOS, FinishReason.STOP_TOKEN, FinishReason.STOP_STRING
_INT64_MASK = (1 << 63) - 1


class InvalidRequestError(ValueError):
    """A request is refused before scheduling; ``field`` names what is wrong."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def _stat(stats: object, *names: str, default: int = 0) -> int:
    for n in names:
        v = stats.get(n) if isinstance(stats, dict) else getattr(stats, n, None)
        if v is not None:
            return v
    return default


class LLMEngine:
    def __init__(self, config: EngineConfig, *, loaded_model: Any = None) -> None:
        """``loaded_model``: a ``loader.LoadedModel`` to reuse instead of loading ``config.model``
        (tests and benchmarks that build several engines over the same weights)."""
        from mindie_llm.executor.executor import make_executor
        from mindie_llm.scheduler import Scheduler, SchedulerCoreConfig

        self.executor = make_executor(config, loaded_model=loaded_model)
        info = self.executor.info
        self.arch = info.arch
        self.tokenizer = info.tokenizer
        self.model_name = info.model_name
        self.config = self.executor.config
        self.max_model_len = info.max_model_len
        self.block_size = info.block_size
        self.num_kv_blocks = info.num_kv_blocks
        self.structured_output = StructuredOutputManager(self.tokenizer, self.arch.vocab_size,
                                                         tuple(getattr(self.tokenizer, "eos_token_ids", ()) or ()))
        self._matchers: dict[int, Any] = {}   # sample int id -> structured-output Matcher
        sc = self.config.scheduler
        self.max_num_seqs = sc.max_batch_size
        self.max_num_batched_tokens = sc.max_prefill_tokens
        self.scheduler = Scheduler(SchedulerCoreConfig(
            num_blocks=self.num_kv_blocks, block_size=self.block_size,
            max_num_batched_tokens=sc.max_prefill_tokens, max_num_seqs=sc.max_batch_size,
            max_model_len=self.max_model_len, enable_prefix_caching=self.config.cache.enable_prefix_caching,
            enable_chunked_prefill=sc.enable_chunked_prefill, policy=sc.policy, role=sc.role,
            num_lookahead_slots=1 if sc.async_scheduling else 0))
        eos = tuple(getattr(self.tokenizer, "eos_token_ids", ()) or ()) + tuple(self.arch.eos_token_ids or ())
        self.eos_token_ids = tuple(dict.fromkeys(int(e) for e in eos))
        self._rng = np.random.default_rng(self.config.model.seed)
        self._groups: dict[str, RequestGroup] = {}
        self._samples: dict[int, Sample] = {}
        self._unsent = NewRequestTable()       # admitted, not yet in a step message
        self._next_id = 1
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._last_step_time = time.monotonic()
        self._spec = [0, 0, 0]                 # drafts, draft tokens, accepted tokens (cumulative)

    @property
    def runner(self) -> Any:
        """The in-process driver worker's runner (benchmarks and tests inspect it)."""
        return self.executor.driver.runner

    @property
    def model(self) -> Any:
        """The in-process driver worker's model."""
        return self.executor.driver.model

    # ------------------------------------------------------------------------------------ requests
    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("prompt", "the model has no tokenizer (no tokenizer.json beside the weights, "
                                      "or dummy weights): pass token ids, or set model.tokenizer")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def validate_request(self, prompt: str | Sequence[int], params: SamplingParams) -> list[int]:
        """Tokenizes ``prompt`` and checks everything add_request would; no side effects."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params", f"must be a SamplingParams; got {type(params).__name__}")
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            ids = self._encode(prompt)
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            ids = [int(t) if isinstance(t, (int, np.integer)) and not isinstance(t, bool) else t for t in prompt]
            bad_type = next((i for i, t in enumerate(ids) if not isinstance(t, int)), None)
            if bad_type is not None:
                raise InvalidRequestError("prompt_token_ids", f"element {bad_type} is not an integer: {ids[bad_type]!r}")
        else:
            raise InvalidRequestError("prompt", f"must be a string or a list of token ids; got {type(prompt).__name__}")
        if not ids:
            raise InvalidRequestError("prompt", "must not be empty (it has no tokens)")
        arr = np.asarray(ids, dtype=np.int64)
        bad = np.flatnonzero((arr < 0) | (arr >= self.arch.vocab_size))
        if bad.size:
            i = int(bad[0])
            raise InvalidRequestError("prompt_token_ids", f"token id {ids[i]} at index {i} is outside the "
                                      f"vocabulary [0, {self.arch.vocab_size})")
        self._check_admission(ids, params)
        if params.n > self.config.scheduler.max_n:
            raise InvalidRequestError("n", f"{params.n} is above the configured cap scheduler.max_n="
                                      f"{self.config.scheduler.max_n}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(params, name)
            if v is not None and v > self.arch.vocab_size:
                raise InvalidRequestError(name, f"{v} is above the vocabulary size {self.arch.vocab_size}")
        bad_bias = next((t for t in params.logit_bias or () if t >= self.arch.vocab_size), None)
        if bad_bias is not None:
            raise InvalidRequestError("logit_bias", f"token id {bad_bias} is outside the vocabulary "
                                      f"[0, {self.arch.vocab_size})")
        if getattr(params, "guided_decoding", None) is not None:
            self.structured_output.compile(params.guided_decoding)   # GuidedDecodingError names the key
        return ids

    def _check_admission(self, ids: list[int], params: SamplingParams) -> None:
        """The scheduler's own admission rules (length, KV pool, chunking), asked without side
        effects so that they are written once, in C++; the error names the field to change."""
        from mindie_llm.scheduler import RequestRejectedError

        try:
            self.scheduler.check_request(np.asarray(ids, np.int32), params.max_tokens, min_tokens=params.min_tokens,
                                         stop_token_ids=tuple(params.stop_token_ids or ()),
                                         ignore_eos=params.ignore_eos)
        except RequestRejectedError as e:
            named = getattr(e, "field", None)
            if named in ("min_tokens", "max_tokens", "stop_token_ids"):
                field = named
            else:   # the length rules: the prompt alone too long, else the room asked for
                field = "prompt" if named == "prompt_token_ids" or len(ids) >= self.max_model_len else "max_tokens"
            raise InvalidRequestError(field, str(e)) from None

    def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams, *,
                    arrival_time: float | None = None, priority: int = 0) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id", "must be a non-empty string")
        if request_id in self._groups:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        ids = self.validate_request(prompt, params)
        now = time.time()
        group = RequestGroup(request_id=request_id, prompt=prompt if isinstance(prompt, str) else None,
                             prompt_token_ids=ids, params=params,
                             metrics=RequestMetrics(arrival_time=arrival_time or now, num_prompt_tokens=len(ids)))
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None]
        base_seed = params.seed if params.seed is not None else int(self._rng.integers(0, _INT64_MASK))
        added: list[int] = []
        try:
            for i in range(params.n):
                int_id = self._next_id
                self._next_id += 1
                self.scheduler.add_request(
                    int_id, np.asarray(ids, dtype=np.int32), params.max_tokens, min_tokens=params.min_tokens,
                    priority=priority, arrival_time=arrival_time or now,
                    eos_token_ids=self.eos_token_ids, stop_token_ids=tuple(params.stop_token_ids or ()),
                    ignore_eos=params.ignore_eos, parent_id=added[0] if added else -1)
                added.append(int_id)
                seed = (base_seed + i * 0x9E3779B97F4A7C15) & _INT64_MASK if i else base_seed
                self._unsent.add(int_id, ids, params, seed, self._min_tokens_ban(params),
                                 prompt_logprobs=(i == 0 and params.prompt_logprobs is not None))
                detok = IncrementalDetokenizer(self.tokenizer or _NULL_DECODER, ids, skip_special_tokens=params.skip_special_tokens,
                                               stop=params.stop_strings, min_tokens=params.min_tokens,
                                               include_stop_str_in_output=params.include_stop_str_in_output)
                sample = Sample(int_id=int_id, index=i, group=group, detok=detok,
                                logprobs=[] if params.logprobs is not None else None,
                                cumulative_logprob=0.0 if params.logprobs is not None else None)
                group.samples.append(sample)
                self._samples[int_id] = sample
                if params.guided_decoding is not None:
                    self._matchers[int_id] = self.structured_output.new_matcher(params.guided_decoding)
        except ValueError as e:
            for int_id in added:
                self.scheduler.abort(int_id)
                self._unsent.discard(int_id)
                self._samples.pop(int_id, None)
                self._matchers.pop(int_id, None)
            if added or not hasattr(e, "field"):
                raise InvalidRequestError("prompt", f"refused by the scheduler: {e}") from e
            raise
        self._groups[request_id] = group
        self._prompt_tokens_total += len(ids)

    def abort_request(self, request_id: str) -> None:
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for s in group.samples:
            self.scheduler.abort(s.int_id)          # workers drop it through the next finished_ids
            self._unsent.discard(s.int_id)
            self._samples.pop(s.int_id, None)
            self._matchers.pop(s.int_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    def get_num_unfinished_requests(self) -> int:
        return len(self._groups)

    # ------------------------------------------------------------------------------------ step
    def _min_tokens_ban(self, params: SamplingParams) -> list[int]:
        """Token ids masked while fewer than ``min_tokens`` are out: the stop ids and, unless
        ``ignore_eos``, EOS (the one place this rule is written)."""
        if not params.min_tokens:
            return []
        ids = list(params.stop_token_ids or ())
        if not params.ignore_eos:
            ids += self.eos_token_ids
        return list(dict.fromkeys(i for i in ids if 0 <= i < self.arch.vocab_size))

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        out.new_requests = self._unsent.take(out.req_ids, out.block_table_reset)
        if self._matchers:
            self._fill_grammar(out)
        now = time.time()
        first = np.asarray(out.block_table_reset, bool)   # a row scheduled the first time sends its whole table
        for rid, ncomp in zip(np.asarray(out.req_ids)[first].tolist(),
                              np.asarray(out.num_computed_tokens)[first].tolist()):
            s = self._samples.get(rid)
            if s is not None and s.index == 0 and s.group.metrics.first_scheduled_time is None:
                s.group.metrics.first_scheduled_time = now
                s.group.metrics.num_cached_tokens = int(ncomp)
        try:
            res = self.executor.execute(out)
        except Exception:  # the forward failed: the whole batch is lost, the engine lives on
            logger.exception("model runner failed; aborting the %d requests of this step", len(out.req_ids))
            self.scheduler.update(np.zeros(0, np.int64), np.zeros(0, np.int32))
            touched = {}
            for rid in np.asarray(out.req_ids).tolist():
                s = self._samples.get(rid)
                if s is not None:
                    self._finish(s, "abort", None, abort=True)
                    touched[s.group.request_id] = s.group
            return self._emit(touched)
        self._count_speculation(out, res)
        upd, num_appended = self._update(res)
        now = time.time()
        finished = dict(zip(np.asarray(upd.finished_ids).tolist(), np.asarray(upd.finish_reasons).tolist()))
        self._last_step_time = time.monotonic()
        touched: dict[str, RequestGroup] = {}
        for owner, plp_step in res.prompt_logprobs.items():
            s = self._samples.get(owner)
            if s is None or s.group.prompt_logprobs is None:
                continue
            plp = s.group.prompt_logprobs
            for j in np.argsort(plp_step.positions, kind="stable").tolist():
                pos = int(plp_step.positions[j])
                if pos < len(plp):      # recomputed after preemption: already have it
                    continue
                plp.extend([None] * (pos - len(plp)))   # positions served from the prefix cache
                plp.append(self._logprob_dict(int(plp_step.token_ids[j]), float(plp_step.logprobs[j]),
                                              int(plp_step.ranks[j]), plp_step.top_ids[j], plp_step.top_logprobs[j]))
        offs = res.token_offsets.tolist()
        for i, rid in enumerate(res.req_ids.tolist()):
            s = self._samples.get(rid)
            if s is None:
                continue
            touched[s.group.request_id] = s.group
            n = int(num_appended[i])
            reason = finished.pop(rid, 0)
            try:
                for k in range(offs[i], offs[i] + n):
                    self._process_token(s, int(res.token_ids[k]), reason if k == offs[i] + n - 1 else 0,
                                        self._token_logprobs(res, i, k, s), now)
                    if s.finished:
                        break
            except Exception:
                logger.exception("processing the output of request %s failed; aborting it", s.group.request_id)
                self._finish(s, "abort", None, abort=True)
        for rid, reason in finished.items():  # finished without a token this step
            s = self._samples.get(rid)
            if s is not None and not s.finished:
                self._finish(s, FINISH_REASON_NAMES.get(reason, "abort"), None)
                touched[s.group.request_id] = s.group
        return self._emit(touched)

    def _fill_grammar(self, out: Any) -> None:
        """Structured output: the packed token masks of the constrained rows that sample this step."""
        rows = [(rid, self._matchers[rid]) for rid, smp in zip(np.asarray(out.req_ids).tolist(),
                                                               np.asarray(out.sample_mask).tolist())
                if smp and rid in self._matchers]
        if rows:
            out.grammar_req_ids = np.asarray([r for r, _ in rows], np.int64)
            out.grammar_bitmask = self.structured_output.fill_bitmask([m for _, m in rows]).ravel()

    def _update(self, res: ModelRunnerOutput) -> tuple[Any, np.ndarray]:
        """Hands the runner's tokens (CSR) and next-step proposals to the scheduler; returns the
        UpdateResult and how many tokens of each row it took (fewer when one finished the request)."""
        upd = self.scheduler.update(res.req_ids, res.token_offsets, res.token_ids, res.draft_offsets,
                                    res.draft_token_ids)
        return upd, upd.num_appended

    def _count_speculation(self, out: Any, res: ModelRunnerOutput) -> None:
        """Acceptance counters: rows verified with proposals, proposals, accepted ones."""
        offs = np.asarray(out.spec_offsets)
        if not len(offs) or not offs[-1] or not res.num_rows:
            return
        nspec = np.diff(offs.astype(np.int64))[np.asarray(out.sample_mask, bool)]     # [S]
        acc = np.diff(res.token_offsets.astype(np.int64)) - 1                        # [S]
        has = nspec > 0
        self._spec[0] += int(has.sum())
        self._spec[1] += int(nspec.sum())
        self._spec[2] += int(np.minimum(acc[has], nspec[has]).sum())

    def _token_logprobs(self, res: ModelRunnerOutput, row: int, k: int, s: Sample):
        if res.token_logprobs is None or s.logprobs is None or not res.logprob_rows[row]:
            return None
        n = s.group.params.logprobs or 0
        return (int(res.token_ids[k]), float(res.token_logprobs[k]), int(res.token_ranks[k]),
                res.top_ids[k][:n], res.top_logprobs[k][:n])

    def _process_token(self, s: Sample, tok: int, reason: int, lp, now: float) -> None:
        matcher = self._matchers.get(s.int_id)
        if matcher is not None and not reason and not matcher.accept(tok):
            # The grammar had nowhere to go (or the token broke it): end with a reason that says so.
            self.scheduler.finish(s.int_id, FinishReason.ABORTED)
            self._finish(s, "abort", f"structured output: {matcher.error}")
            return
        m = s.group.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        s.token_ids.append(tok)
        self._generation_tokens_total += 1
        if lp is not None:
            s.logprobs.append(self._logprob_dict(*lp))
            s.cumulative_logprob = (s.cumulative_logprob or 0.0) + lp[1]
        skip_last = reason in (_EOS, _STOP_TOKEN) and not s.group.params.include_stop_str_in_output
        hit = s.detok.update([tok], skip_last=skip_last)
        if matcher is not None and hit is None and not reason and matcher.done:
            self.scheduler.finish(s.int_id, _STOP_STRING)   # the grammar is complete: stop as a stop string does
            self._finish(s, "stop", None)
            return
        if hit is not None and not reason:
            self.scheduler.finish(s.int_id, _STOP_STRING)
            self._finish(s, "stop", hit)
        elif hit is not None:
            self._finish(s, "stop", hit)
        elif reason:
            stop_reason = tok if reason in (_EOS, _STOP_TOKEN) else None
            self._finish(s, FINISH_REASON_NAMES.get(reason, "abort"), stop_reason)

    def _finish(self, s: Sample, finish_reason: str, stop_reason: str | int | None, abort: bool = False) -> None:
        if abort:
            self.scheduler.abort(s.int_id)
        if finish_reason != "stop" or not isinstance(stop_reason, str):
            s.detok.finish()
        s.finish_reason, s.stop_reason = finish_reason, stop_reason
        self._samples.pop(s.int_id, None)
        self._matchers.pop(s.int_id, None)

    def _emit(self, touched: dict[str, RequestGroup]) -> list[RequestOutput]:
        outs = []
        for rid, g in touched.items():
            if g.finished:
                g.metrics.finished_time = time.time()
                if g.prompt_logprobs is not None:
                    g.prompt_logprobs.extend([None] * (len(g.prompt_token_ids) - len(g.prompt_logprobs)))
                self._groups.pop(rid, None)
            outs.append(g.to_output())
        return outs

    def _logprob_dict(self, token_id: int, logprob: float, rank: int, top_ids, top_logprobs) -> dict[int, Logprob]:
        d: dict[int, Logprob] = {}
        for r, (t, v) in enumerate(zip(np.asarray(top_ids).tolist(), np.asarray(top_logprobs).tolist()), start=1):
            d[t] = Logprob(v, r, self._decode_one(t))
        if token_id not in d:
            d[token_id] = Logprob(logprob, rank, self._decode_one(token_id))
        return d

    def _decode_one(self, t: int) -> str | None:
        return self.tokenizer.decode([t], skip_special_tokens=False) if self.tokenizer is not None else None

    # ------------------------------------------------------------------------------------ misc
    def check_health(self) -> None:
        """Raises (the executor's error, naming the rank) once a worker is dead or hung."""
        self.executor.check_health()

    def shutdown(self) -> None:
        """Stops the executor's workers (idempotent)."""
        self.executor.shutdown()

    def get_stats(self) -> EngineStats:
        st = self.scheduler.stats()
        return EngineStats(
            num_waiting=_stat(st, "num_waiting", "waiting"), num_running=_stat(st, "num_running", "running"),
            num_kv_blocks=self.num_kv_blocks,
            num_free_kv_blocks=_stat(st, "num_free_blocks", "free_blocks"),
            num_cached_kv_blocks=_stat(st, "num_cached_blocks", "cached_blocks"),
            prefix_cache_queries=_stat(st, "prefix_cache_queries"), prefix_cache_hits=_stat(st, "prefix_cache_hits"),
            num_preemptions=_stat(st, "num_preemptions", "preemptions"),
            num_prompt_tokens_total=self._prompt_tokens_total,
            num_generation_tokens_total=self._generation_tokens_total, last_step_time=self._last_step_time,
            spec_num_drafts=self._spec[0], spec_num_draft_tokens=self._spec[1],
            spec_num_accepted_tokens=self._spec[2])

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.tokenizer is None:
            raise InvalidRequestError("messages", "the model has no tokenizer (no tokenizer.json beside the "
                                      "weights, or dummy weights): set model.tokenizer")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


class _NullDecoder:
    """Stands in for the tokenizer of dummy weights: token ids only, no text."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return ""


_NULL_DECODER = _NullDecoder()
