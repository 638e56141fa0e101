# SPDX-License-Identifier: Apache-2.0
"""The engine's Python-side state of a request: a group of ``n`` samples sharing one prompt.

Scheduling state (tokens computed, blocks) lives in the C++ scheduler keyed by each sample's int
id; this module keeps what Python needs to build outputs: detokenizer, logprobs, finish reasons,
timings. Must not import torch, the scheduler or the executor.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mindie_llm.engine.detokenizer import IncrementalDetokenizer
from mindie_llm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from mindie_llm.sampling_params import SamplingParams

__all__ = ["Sample", "RequestGroup", "FINISH_REASON_NAMES"]

# Contract 3 FinishReason -> the OpenAI/vLLM finish_reason string.
FINISH_REASON_NAMES = {1: "stop", 2: "stop", 3: "stop", 4: "length", 5: "length", 6: "abort", 7: "stop"}


@dataclass
class Sample:
    int_id: int
    index: int
    group: "RequestGroup"
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index, text=self.detok.visible_text(self.finished), token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason)


@dataclass
class RequestGroup:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    samples: list[Sample] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples)

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=list(self.prompt_token_ids),
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
            outputs=[s.to_output() for s in self.samples], finished=self.finished, metrics=self.metrics)
