# SPDX-License-Identifier: Apache-2.0
"""Result types of a generation (shaped like vLLM's): RequestOutput, CompletionOutput, Logprob,
RequestMetrics.

Plain dataclasses; must not import torch or anything of the package.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Logprob", "CompletionOutput", "RequestMetrics", "RequestOutput"]


@dataclass
class Logprob:
    """The log probability of one token; ``rank`` is 1 for the most likely token."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One sample of a request. Text, token ids and logprobs are cumulative."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None     # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (``time.time()``) of one request's life, and its token counts."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class RequestOutput:
    """Everything a request has produced so far; ``finished`` once all ``n`` samples are done."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=0.0))


@dataclass
class EngineStats:
    """Engine-wide counters after the last step (the metrics and health endpoints read these)."""

    num_waiting: int = 0
    num_running: int = 0
    num_kv_blocks: int = 0
    num_free_kv_blocks: int = 0
    num_cached_kv_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0          # cumulative
    num_prompt_tokens_total: int = 0  # cumulative
    num_generation_tokens_total: int = 0  # cumulative
    last_step_time: float = 0.0       # time.monotonic() of the last step
    # Speculative decoding (cumulative): verify steps of rows with proposals, tokens proposed to
    # the target, and of those, tokens it accepted.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted / proposed tokens (0 when nothing was proposed)."""
        return self.spec_num_accepted_tokens / self.spec_num_draft_tokens if self.spec_num_draft_tokens else 0.0

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens a row with proposals emits per verify step (accepted + 1; 0 when none)."""
        return 1.0 + self.spec_num_accepted_tokens / self.spec_num_drafts if self.spec_num_drafts else 0.0
