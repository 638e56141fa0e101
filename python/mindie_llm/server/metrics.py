# SPDX-License-Identifier: Apache-2.0
"""Prometheus metrics of one server, in its own ``CollectorRegistry``.

Owns the metric names and how they are fed (the ``mindie_*`` names, and vLLM's names under a
``mindie:`` prefix so that vLLM dashboards work with the prefix changed): request-level histograms and counters from
``AsyncLLM`` request records (so HTTP and gRPC requests count alike), engine gauges read from
``AsyncLLM.get_stats()`` at scrape time. Must not import torch or any web framework.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mindie_llm.engine.async_llm import RequestRecord

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
_FINISHED = {"stop": "stop", "length": "length", "abort": "abort"}


class _EngineCollector(Collector):
    """Gauges and cumulative counters read from the engine's stats at scrape time."""

    def __init__(self, async_llm: Any, model_name: str) -> None:
        self._llm = async_llm
        self._model = model_name

    def collect(self) -> Iterator[Any]:
        s = self._llm.get_stats()
        labels = ["model_name"]
        values = [self._model]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, float(value))
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, float(value))
            return c

        total = max(int(s.num_kv_blocks), 0)
        free = int(s.num_free_kv_blocks)
        queries = int(s.prefix_cache_queries)
        yield gauge("mindie_num_requests_waiting", "Requests queued in the scheduler.", s.num_waiting)
        yield gauge("mindie_num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("mindie_kv_blocks_total", "KV cache blocks in the pool (block 0 included).", total)
        yield gauge("mindie_kv_blocks_free", "KV cache blocks free to allocate.", free)
        yield gauge("mindie_kv_blocks_cached", "Free KV blocks still holding a cached prefix.",
                    s.num_cached_kv_blocks)
        usable = max(total - 1, 0)  # block 0 is the null block, never allocated
        yield gauge("mindie_kv_cache_usage_ratio", "Fraction of allocatable KV blocks in use (0..1).",
                    max(usable - free, 0) / usable if usable else 0.0)
        yield gauge("mindie_prefix_cache_hit_rate", "Prefix-cache hits / queries since start (0..1).",
                    int(s.prefix_cache_hits) / queries if queries else 0.0)
        yield counter("mindie_prefix_cache_queries", "Prefix-cache lookups.", queries)
        yield counter("mindie_prefix_cache_hits", "Prefix-cache lookups that hit.", s.prefix_cache_hits)
        yield counter("mindie_num_preemptions", "Requests preempted (recompute) since start.", s.num_preemptions)
        yield counter("mindie_prompt_tokens", "Prompt tokens processed since start.", s.num_prompt_tokens_total)
        yield counter("mindie_generation_tokens", "Tokens generated since start.", s.num_generation_tokens_total)
        drafts, proposed = int(s.spec_num_drafts), int(s.spec_num_draft_tokens)
        yield counter("mindie_spec_decode_draft_tokens", "Speculative tokens proposed to the target.", proposed)
        yield counter("mindie_spec_decode_accepted_tokens", "Speculative tokens the target accepted.",
                      s.spec_num_accepted_tokens)
        yield gauge("mindie_spec_decode_acceptance_rate", "Accepted / proposed speculative tokens since start (0..1).",
                    s.spec_num_accepted_tokens / proposed if proposed else 0.0)
        yield gauge("mindie_spec_decode_mean_accepted_length", "Tokens per verify step of rows with proposals "
                    "(accepted + 1; 0 before any).", 1 + s.spec_num_accepted_tokens / drafts if drafts else 0.0)
        yield gauge("mindie_engine_live", "1 while the engine loop makes progress.", 1.0 if self._llm.is_live() else 0.0)
        # vLLM's names (v1), under the mindie: prefix.
        yield gauge("mindie:num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("mindie:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("mindie:kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent.",
                    max(usable - free, 0) / usable if usable else 0.0)
        yield counter("mindie:prefix_cache_queries", "Prefix-cache lookups.", queries)
        yield counter("mindie:prefix_cache_hits", "Prefix-cache lookups that hit.", s.prefix_cache_hits)
        yield counter("mindie:num_preemptions", "Cumulative preemptions.", s.num_preemptions)
        yield counter("mindie:prompt_tokens", "Prefill tokens processed.", s.num_prompt_tokens_total)
        yield counter("mindie:generation_tokens", "Generation tokens processed.", s.num_generation_tokens_total)


class ServerMetrics:
    """All metrics of one server; :meth:`observe` is an ``AsyncLLM`` request listener."""

    def __init__(self, async_llm: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        model = async_llm.model_name
        self._model = model
        self.requests = Counter("mindie_requests", "Requests by outcome (stop, length, abort, cancelled, "
                                "rejected_invalid, rejected_queue_full, rejected_draining, error).",
                                ["model_name", "outcome"], registry=self.registry)
        self.ttft = Histogram("mindie_time_to_first_token_seconds", "Arrival to first generated token.",
                              ["model_name"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("mindie_time_per_output_token_seconds",
                              "Mean time between generated tokens of a request after the first.",
                              ["model_name"], buckets=_TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("mindie_e2e_request_latency_seconds", "Arrival to the request's end.",
                             ["model_name"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        m = ["model_name"]

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            h = Histogram(name, doc, m, buckets=buckets, registry=self.registry)
            h.labels(model)   # exported (at zero) from the start, as vLLM's are
            return h

        self.v_success = Counter("mindie:request_success", "Finished requests by finish reason.",
                                 ["model_name", "finished_reason"], registry=self.registry)
        self.v_ttft = hist("mindie:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.v_itl = hist("mindie:inter_token_latency_seconds", "Time between consecutive output tokens.",
                          _TPOT_BUCKETS)
        self.v_tpot = hist("mindie:time_per_output_token_seconds", "Mean time per output token of a request.",
                           _TPOT_BUCKETS)
        self.v_e2e = hist("mindie:e2e_request_latency_seconds", "Arrival to end of a request.", _LATENCY_BUCKETS)
        self.v_queue = hist("mindie:request_queue_time_seconds", "Time waiting before the first schedule.",
                            _LATENCY_BUCKETS)
        self.v_prefill = hist("mindie:request_prefill_time_seconds", "First schedule to first token.",
                              _LATENCY_BUCKETS)
        self.v_decode = hist("mindie:request_decode_time_seconds", "First token to last token.", _LATENCY_BUCKETS)
        self.v_inference = hist("mindie:request_inference_time_seconds", "First schedule to last token.",
                                _LATENCY_BUCKETS)
        self.v_prompt_tokens = hist("mindie:request_prompt_tokens", "Prompt tokens per request.", _TOKEN_BUCKETS)
        self.v_gen_tokens = hist("mindie:request_generation_tokens", "Generated tokens per request.",
                                 _TOKEN_BUCKETS)
        self.v_max_tokens = hist("mindie:request_params_max_tokens", "max_tokens per request.", _TOKEN_BUCKETS)
        self.v_n = hist("mindie:request_params_n", "n per request.", (1, 2, 5, 10, 20))
        self.registry.register(_EngineCollector(async_llm, model))
        async_llm.add_listener(self.observe)

    def count_outcome(self, outcome: str) -> None:
        """Counts a request that ended before reaching the engine (e.g. refused by validation)."""
        self.requests.labels(self._model, outcome).inc()

    def observe(self, record: RequestRecord) -> None:
        self.requests.labels(self._model, record.outcome).inc()
        if record.outcome.startswith("rejected"):
            return
        if record.first_token_time is not None:
            self.ttft.labels(self._model).observe(record.first_token_time - record.arrival_time)
            if record.finished_time is not None and record.num_generation_tokens > 1:
                self.tpot.labels(self._model).observe(
                    (record.finished_time - record.first_token_time) / (record.num_generation_tokens - 1))
        if record.finished_time is not None:
            self.e2e.labels(self._model).observe(record.finished_time - record.arrival_time)
        self._observe_vllm(record)

    def _observe_vllm(self, record: RequestRecord) -> None:
        mdl = self._model
        reason = _FINISHED.get(record.outcome)
        if reason is None:   # cancelled or failed: not a finished request in vLLM's sense
            return
        self.v_success.labels(mdl, reason).inc()
        if record.first_token_time is not None:
            self.v_ttft.labels(mdl).observe(record.first_token_time - record.arrival_time)
            if record.finished_time is not None and record.num_generation_tokens > 1:
                self.v_tpot.labels(mdl).observe(
                    (record.finished_time - record.first_token_time) / (record.num_generation_tokens - 1))
        itl = self.v_itl.labels(mdl)
        for gap in getattr(record, "inter_token_latencies", ()) or ():
            itl.observe(gap)
        if record.finished_time is not None:
            self.v_e2e.labels(mdl).observe(record.finished_time - record.arrival_time)
        em = getattr(record, "engine_metrics", None)
        if em is not None:
            for h, a, b in ((self.v_queue, em.arrival_time, em.first_scheduled_time),
                            (self.v_prefill, em.first_scheduled_time, em.first_token_time),
                            (self.v_decode, em.first_token_time, em.last_token_time),
                            (self.v_inference, em.first_scheduled_time, em.last_token_time)):
                if a is not None and b is not None and b >= a:
                    h.labels(mdl).observe(b - a)
        self.v_prompt_tokens.labels(mdl).observe(record.num_prompt_tokens)
        self.v_gen_tokens.labels(mdl).observe(record.num_generation_tokens)
        self.v_max_tokens.labels(mdl).observe(getattr(record, "max_tokens", 0))
        self.v_n.labels(mdl).observe(getattr(record, "n", 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
