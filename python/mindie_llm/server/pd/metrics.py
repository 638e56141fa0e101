# SPDX-License-Identifier: Apache-2.0
"""Prometheus metrics of the PD router, added to the router's ``ServerMetrics`` registry: per
instance (up, queue, KV blocks total / free, pinned requests, pending transfers, bytes, failures,
pin timeouts: read from the health thread's last Stats at scrape time) and per phase (prefill,
transfer, decode: time histograms by instance, transfer bytes; retries and failures by phase).
Must not import torch or any web framework."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["install_pd_metrics"]

_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_GAUGES = [("queued_prompt_tokens", "Prompt tokens admitted and not yet prefilled."),
           ("num_waiting", "Requests queued in the instance's scheduler."),
           ("num_running", "Requests in the instance's running batch."),
           ("num_kv_blocks", "KV blocks in the instance's pool (block 0 included)."),
           ("num_free_kv_blocks", "KV blocks free to allocate on the instance."),
           ("num_pinned_requests", "Prefill: requests whose blocks are pinned awaiting their transfer."),
           ("num_pending_transfers", "Decode: requests awaiting their KV.")]
_COUNTERS = [("kv_bytes_sent", "KV bytes the instance sent."), ("kv_bytes_received", "KV bytes the instance received."),
             ("num_transfer_failures", "Transfers the instance failed to send."),
             ("num_pin_timeouts", "Pinned requests released because nobody pulled them in time.")]


class _InstanceCollector(Collector):
    def __init__(self, router: Any) -> None:
        self._router = router

    def collect(self) -> Iterator[Any]:
        labels = ["instance", "role"]
        up = GaugeMetricFamily("mindie_pd_instance_up", "1 while the instance answers health checks.", labels=labels)
        gauges = {k: GaugeMetricFamily(f"mindie_pd_instance_{k}", doc, labels=labels) for k, doc in _GAUGES}
        counters = {k: CounterMetricFamily(f"mindie_pd_instance_{k}", doc, labels=labels) for k, doc in _COUNTERS}
        events = CounterMetricFamily("mindie_pd_events", "Router retries and failures by phase.",
                                     labels=["kind", "phase"])
        for inst in self._router.instances:
            lv = [inst.address, inst.role]
            up.add_metric(lv, 1.0 if inst.up else 0.0)
            if inst.stats is None:
                continue
            for k in gauges:
                gauges[k].add_metric(lv, float(getattr(inst.stats, k)))
            for k in counters:
                counters[k].add_metric(lv, float(getattr(inst.stats, k)))
        for (kind, phase), n in sorted(self._router.events.items()):
            events.add_metric([kind, phase], float(n))
        yield up
        yield from gauges.values()
        yield from counters.values()
        yield events


def install_pd_metrics(router: Any, registry: Any) -> None:
    """Registers the instance collector and the phase histograms on ``registry``."""
    registry.register(_InstanceCollector(router))
    seconds = Histogram("mindie_pd_phase_seconds", "Time of one request's phase on an instance.",
                        ["phase", "instance"], buckets=_BUCKETS, registry=registry)
    nbytes = Counter("mindie_pd_transfer_bytes", "KV bytes moved into a decode instance.", ["instance"],
                     registry=registry)

    def on_phase(phase: str, instance: str, s: float, b: int) -> None:
        seconds.labels(phase, instance).observe(s)
        if b:
            nbytes.labels(instance).inc(b)
    router.phase_listeners.append(on_phase)
