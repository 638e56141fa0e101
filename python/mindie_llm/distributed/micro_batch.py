# SPDX-License-Identifier: Apache-2.0
"""Micro-batch overlap of tensor-parallel communication (MindIE's two micro-batches).

A step's flat batch is split in two at the request boundary nearest to half its tokens
(``split_batch``). ``run_interleaved`` then walks both micro-batches through the model's stages
(embedding, then attention and MLP of every layer; each stage ends in a partial sum that must be
all-reduced): it starts micro-batch A's all-reduce asynchronously, computes micro-batch B's stage
while A's reduction is in flight, then waits on A and computes A's next stage while B's reduction
is in flight, and so on. Every rank issues the collectives in the same order, so one process
group suffices. On the CPU gloo's async work runs on its own threads; on CUDA (NCCL) and the NPU
(HCCL) on the communicator's stream (a handle's ``wait`` is a stream dependency, so that the
compute of one micro-batch and the all-reduce of the other run at once, also inside a graph).

A batch of one request (or one token) is not split: it runs the plain forward.

Imports only torch (the attention metadata is read by its fields and copied with
``dataclasses.replace``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from mindie_llm.distributed.parallel_state import ParallelContext

__all__ = ["run_interleaved", "split_point", "split_batch", "forward_overlapped", "OverlappedModel"]

Stage = Callable[[Any, Any], tuple[torch.Tensor, Any]]


def run_interleaved(micro_batches: Sequence[Iterable[Stage]], parallel: ParallelContext
                    ) -> list[tuple[torch.Tensor, Any]]:
    """Runs each micro-batch's stages in turn; a stage ``f(hidden, residual) -> (partial,
    residual)`` gets the all-reduced output of the previous stage (None, None for the first).
    Returns each micro-batch's last (reduced hidden, residual)."""
    iters = [iter(m) for m in micro_batches]
    n = len(iters)
    state: list[tuple[Any, Any]] = [(None, None)] * n
    pending: list[Any] = [None] * n          # (handle, residual) of the reduction in flight
    active = list(range(n))
    while active:
        for m in list(active):
            if pending[m] is not None:
                handle, residual = pending[m]
                pending[m] = None
                state[m] = (handle.wait(), residual)
            stage = next(iters[m], None)
            if stage is None:
                active.remove(m)
                continue
            partial, residual = stage(*state[m])
            pending[m] = (parallel.all_reduce(partial, async_op=True), residual)
    return state


def split_point(query_start_loc: np.ndarray) -> int:
    """The request index k (1 <= k < B) that splits the batch nearest to half its tokens; 0 when
    the batch has fewer than two requests (no split)."""
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    b = qsl.shape[0] - 1
    if b < 2:
        return 0
    half = qsl[-1] / 2.0
    return int(np.argmin(np.abs(qsl[1:b] - half))) + 1


def split_batch(input_ids: torch.Tensor, positions: torch.Tensor, md: Any, k: int,
                query_start_loc: np.ndarray, seq_lens: np.ndarray | None) -> list[tuple[torch.Tensor, torch.Tensor, Any]]:
    """Two (input_ids, positions, metadata) micro-batches: requests [0, k) and [k, B). The host
    copies ``query_start_loc[B+1]`` and ``seq_lens[B]`` give the per-half maxima without a sync;
    ``seq_lens=None`` keeps ``md.max_seq_len`` (an upper bound) for both halves."""
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    sl = None if seq_lens is None else np.asarray(seq_lens, dtype=np.int64)
    b = qsl.shape[0] - 1
    out = []
    for lo, hi in ((0, k), (k, b)):
        t0, t1 = int(qsl[lo]), int(qsl[hi])
        q = md.query_start_loc[lo:hi + 1]
        part = dataclasses.replace(
            md, slot_mapping=md.slot_mapping[t0:t1], query_start_loc=q - q[:1],
            seq_lens=md.seq_lens[lo:hi], block_tables=md.block_tables[lo:hi],
            num_decodes=max(0, min(md.num_decodes, hi) - lo),
            max_query_len=int(np.diff(qsl[lo:hi + 1]).max()),
            max_seq_len=int(md.max_seq_len) if sl is None else int(sl[lo:hi].max()),
            backend_state={})
        out.append((input_ids[t0:t1], positions[t0:t1], part))
    return out


def forward_overlapped(model: Any, input_ids: torch.Tensor, positions: torch.Tensor,
                       kv_caches: list[torch.Tensor], md: Any, query_start_loc: np.ndarray,
                       seq_lens: np.ndarray | None) -> torch.Tensor:
    """``model(input_ids, positions, kv_caches, md)`` computed as two overlapped micro-batches
    (the same values up to float summation order); hidden [T, H]."""
    k = split_point(query_start_loc)
    if k == 0:
        return model(input_ids, positions, kv_caches, md)
    parts = split_batch(input_ids, positions, md, k, query_start_loc, seq_lens)
    return torch.cat(model.forward_micro_batches(parts, kv_caches), dim=0)


class OverlappedModel:
    """Wraps a model so that ``model(input_ids, positions, kv_caches, md)`` runs as two overlapped
    micro-batches; everything else (``compute_logits``, attributes) is the wrapped model's. A
    decode-only batch (one token per request: ``query_start_loc`` is 0..B) is split on the host
    without reading the device, so it can be captured in a device graph (the two micro-batches'
    all-reduces become parallel branches of the graph); any other batch reads its split point from
    ``md.query_start_loc`` / ``md.seq_lens`` (host tensors on the CPU; one small device-to-host
    copy elsewhere)."""

    def __init__(self, model: Any):
        self.__dict__["_model"] = model

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 md: Any) -> torch.Tensor:
        b = md.query_start_loc.shape[0] - 1
        if b < 2:
            return self._model(input_ids, positions, kv_caches, md)
        if md.num_decodes == b == input_ids.shape[0]:
            return forward_overlapped(self._model, input_ids, positions, kv_caches, md,
                                      np.arange(b + 1, dtype=np.int64), None)
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return self._model(input_ids, positions, kv_caches, md)     # no host read inside a capture
        return forward_overlapped(self._model, input_ids, positions, kv_caches, md,
                                  md.query_start_loc.cpu().numpy(), md.seq_lens.cpu().numpy())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)
