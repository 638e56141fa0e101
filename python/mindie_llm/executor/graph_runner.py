# SPDX-License-Identifier: Apache-2.0
"""GraphModelRunner: the ModelRunner with device graphs for decode batches, pinned host staging of
the per-step host-to-device copies, and the next greedy decode overlapped with the host's work on
the current one. The device pieces come from the platform (``Platform.runner_kwargs``): the graph
wrapper class (CUDA: ``backends/cuda/graph.py``), the event class, whether host memory can be
pinned, and the start-up kernel choice (CUDA: the Triton GEMV where it beats cuBLAS per shape).

Decode-only steps (every request computes one token) of up to ``graph_max_batch_size`` requests
replay a graph captured at start-up for the smallest bucket that holds them. Prefill, mixed and
speculative steps run eagerly.

Overlap: after queueing a greedy decode replay, the runner queues the *next* decode of the same
batch with its inputs advanced on the device (``_speculate``), then waits only for the first. When
the engine's next SchedulerOutput is exactly that step (same requests, positions, tokens, no new
blocks, no new requests) its tokens are already on the way; otherwise it is dropped (its K/V writes
land in slots the requests own and are rewritten before any read) and the step runs normally.

Must not import the engine, the scheduler extension or a backend module (the platform hands the
pieces in).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from mindie_llm.contract import ModelRunnerOutput, SchedulerOutput
from mindie_llm.executor.input_batch import FlatBatch
from mindie_llm.executor.model_runner import ModelRunner
from mindie_llm.ops.attention_metadata import AttentionMetadata

__all__ = ["GraphModelRunner"]

logger = logging.getLogger(__name__)


@dataclass
class _InFlight:
    """A greedy decode replay queued on the GPU whose tokens the host has not read yet."""

    req_ids: np.ndarray          # [n] int64, batch order
    ncomp: np.ndarray            # [n] int64: num_computed_tokens of the step
    slots: np.ndarray            # [n] int64 SlotTable slot of each row
    n: int
    bs: int                      # graph bucket
    host: torch.Tensor           # [n] int64 pinned, valid once ``event`` has completed
    event: Any                   # the platform's event, recorded after the copy


class GraphModelRunner(ModelRunner):
    """ModelRunner + device graphs for decode batches + pinned staging of the step's host arrays."""

    def __init__(self, model: nn.Module, vocab_size: int, kv_caches: list[torch.Tensor], *, block_size: int,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, device: torch.device,
                 graph_wrapper_cls: type, event_cls: type, synchronize: Callable[[torch.device], None],
                 select_kernels: Callable[[nn.Module], dict] | None = None, pin_memory: bool = True,
                 enable_cuda_graph: bool | None = None, cuda_graph_max_batch_size: int | None = None,
                 async_scheduling: bool = False) -> None:
        # The engine passes the platform's pieces and the deployment's backend section
        # (Platform.runner_kwargs).
        if enable_cuda_graph is None:
            enable_cuda_graph = True
        if cuda_graph_max_batch_size is None:
            cuda_graph_max_batch_size = 256
        if int(cuda_graph_max_batch_size) < 1:
            raise ValueError(f"cuda_graph_max_batch_size: must be >= 1; got {cuda_graph_max_batch_size}")
        super().__init__(model, vocab_size, kv_caches, block_size=block_size, max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                         device=device, async_scheduling=async_scheduling)
        self._event_cls = event_cls
        self._synchronize = synchronize
        T, B, W = max_num_batched_tokens, max_num_seqs, self.block_tables_buf.shape[1]
        # One pinned buffer per dtype; the numpy views are filled on the host, then copied async.
        T = max(T, min(cuda_graph_max_batch_size, B))                  # room for a padded decode batch
        self._pin64 = torch.empty(3 * T, dtype=torch.int64, pin_memory=pin_memory)
        self._pin32 = torch.empty(2 * T + 1 + B * W, dtype=torch.int32, pin_memory=pin_memory)
        self._np64, self._np32 = self._pin64.numpy(), self._pin32.numpy()
        self._staged: Any = None
        self.padded_batch_size = 0
        self.max_model_len = max_model_len
        self.enable_overlap = enable_cuda_graph     # speculative next decode (needs the graphs)
        self.num_overlapped_steps = 0
        self._inflight: _InFlight | None = None
        self._last_sampled: np.ndarray | None = None
        self._tok_pin = torch.empty((2, max(max_num_seqs, 1)), dtype=torch.int64, pin_memory=pin_memory)
        self._tok_slot = 0
        self.graph_model: Any = None
        self.graph_capture_s = 0.0
        self.eager_buckets: list[int] = graph_wrapper_cls.eager_token_buckets(max_num_batched_tokens) \
            if enable_cuda_graph else []
        # Start-up kernel choice of the platform (CUDA: a Triton GEMV where it beats cuBLAS per shape).
        self.gemv_report: dict = select_kernels(model) if select_kernels is not None else {}
        if enable_cuda_graph:
            max_bs = min(cuda_graph_max_batch_size, max_num_seqs, max_num_batched_tokens)
            num_kv_heads = kv_caches[0].shape[3] if kv_caches else 1
            self.graph_model = graph_wrapper_cls(model, self, graph_wrapper_cls.batch_sizes_for(max_bs),
                                                 num_kv_heads, max_model_len)
            self.graph_capture_s = self.graph_model.capture(kv_caches)
            self.model = self.graph_model
            logger.info("captured %d decode CUDA graphs in %.1f s", len(self.graph_model.graphs),
                        self.graph_capture_s)
            t0 = time.perf_counter()
            self._warm_eager_shapes(kv_caches)
            self.graph_capture_s += time.perf_counter() - t0

    def _graph_step_kind(self, out: SchedulerOutput) -> str | None:
        """"greedy" (one replay, argmax in the graph), "sample" (replay, then the Sampler on the
        graph's logits) or None (the eager path) for a SchedulerOutput already applied."""
        gm = self.graph_model
        n = len(out.req_ids)
        if gm is None or n == 0 or gm._bucket(n) is None:
            return None
        nsched = np.asarray(out.num_scheduled_tokens)
        if not (nsched == 1).all() or not np.asarray(out.sample_mask).all():
            return None
        tab = self.batch.slots
        try:
            sl = tab.slots_of(np.asarray(out.req_ids))                                  # [n]
        except KeyError:
            return None
        ncomp = np.asarray(out.num_computed_tokens, np.int64)
        if ((tab.prompt_logprobs[sl] >= 0) & (ncomp < tab.num_prompt[sl] - 1)).any():
            return None
        banned = (tab.num_output[sl] < tab.min_tokens[sl]) & (tab.ban[sl] >= 0).any(1) if tab.ban.shape[1] else False
        if (tab.temperature[sl] > 0).any() or (tab.logprobs[sl] >= 0).any() or tab.has_penalties[sl].any() \
                or tab.has_bias[sl].any() or len(out.grammar_req_ids) or np.any(banned):
            return "sample"
        return "greedy"

    def set_async_scheduling(self, on: bool) -> None:
        super().set_async_scheduling(on)
        self._inflight = None

    def _step_logits(self, fb: FlatBatch, prev_tokens: torch.Tensor | None) -> torch.Tensor:
        """A plain decode batch that fits a graph bucket replays it (asynchronous scheduling)."""
        n = fb.input_ids.shape[0]
        gm = self.graph_model
        if gm is None or not fb.num_decodes_only or n != fb.seq_lens.shape[0] or gm._bucket(n) is None:
            return super()._step_logits(fb, prev_tokens)
        self._prepare(fb)
        if prev_tokens is not None:
            self.input_ids_buf[:n].copy_(prev_tokens)
        return gm.logits[gm.replay(n)][:n]

    def _execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        spec, self._inflight = self._inflight, None
        if spec is not None and self._matches(spec, out):
            self.apply(out)                       # no block changes: finished ids of others only
            cur = spec
            self.num_overlapped_steps += 1
        else:
            self.apply(out)
            if out.num_reqs == 0:
                return ModelRunnerOutput.empty()
            kind = self._graph_step_kind(out)
            fb = self.batch.build(out)
            if kind is None:
                input_ids, positions, md = self._prepare(fb)
                return self.sample_and_verify(fb, self.model(input_ids, positions, self.kv_caches, md))
            self._prepare(fb)
            n = fb.input_ids.shape[0]
            if kind == "sample":
                bs = self.graph_model.replay(n)
                return self.sample_and_verify(fb, None, logits=self.graph_model.logits[bs][:n])
            bs = self.graph_model.replay(n)
            cur = self._greedy_launched(fb.sample_req_ids, np.asarray(out.num_computed_tokens, np.int64),
                                        fb.sample_slots, n, bs)
        # Queue the next decode of the same batch behind this one, so that the GPU computes it while
        # the host returns the tokens, updates the scheduler and schedules (used if it matches).
        self._inflight = self._speculate(cur)
        cur.event.synchronize()                                                       # the host sync
        sampled = cur.host.numpy().astype(np.int32)
        self._last_sampled = sampled
        self.batch.slots.append(cur.slots, np.arange(cur.n + 1), sampled)
        return ModelRunnerOutput.one_token_each(cur.req_ids, sampled)

    def _greedy_launched(self, req_ids: np.ndarray, ncomp: np.ndarray, slots: np.ndarray, n: int,
                         bs: int) -> "_InFlight":
        """Tokens of the replay just queued: copied to a pinned buffer behind it, with an event."""
        host = self._tok_pin[self._tok_slot, :n]
        self._tok_slot ^= 1                             # two steps can be in flight
        host.copy_(self.graph_model.greedy[bs][:n], non_blocking=True)
        event = self._event_cls()
        event.record()
        return _InFlight(req_ids, ncomp, slots, n, bs, host, event)

    def _speculate(self, cur: "_InFlight") -> "_InFlight | None":
        """Replays the next greedy decode of ``cur``'s batch with its inputs advanced on the GPU
        (tokens = this step's argmax, positions, slots and lengths + 1), when the next token stays
        in each request's current block (no new block id needed) and stays greedy. Its K/V writes
        go to slots the requests own, so a discarded speculation leaves nothing wrong behind."""
        nxt = cur.ncomp + 1
        if not self.enable_overlap or ((nxt % self.block_size) == 0).any() or (nxt + 1 > self.max_model_len).any():
            return None
        tab, sl = self.batch.slots, cur.slots
        if tab.ban.shape[1] and ((tab.num_output[sl] + 1 < tab.min_tokens[sl]) & (tab.ban[sl] >= 0).any(1)).any():
            return None
        n, bs = cur.n, cur.bs
        if self.step_timer is not None:
            self.step_timer.device_begin()
        self.input_ids_buf[:n].copy_(self.graph_model.greedy[bs][:n])
        self.positions_buf[:n] += 1
        self.slot_mapping_buf[:n] += 1
        self.seq_lens_buf[:n] += 1
        self.padded_batch_size = bs
        self.graph_model.replay(n)
        return self._greedy_launched(cur.req_ids, nxt, cur.slots, n, bs)

    def _matches(self, spec: "_InFlight", out: SchedulerOutput) -> bool:
        """Is ``out`` exactly the step that ``spec`` computes?"""
        return (len(out.req_ids) == spec.n and np.array_equal(np.asarray(out.req_ids), spec.req_ids)
                and np.array_equal(np.asarray(out.num_computed_tokens, np.int64), spec.ncomp)
                and (np.asarray(out.num_scheduled_tokens) == 1).all() and np.asarray(out.sample_mask).all()
                and len(out.new_block_ids) == 0 and not np.asarray(out.block_table_reset).any()
                and out.new_requests.num_reqs == 0 and len(out.grammar_req_ids) == 0
                and self._last_sampled is not None
                and np.array_equal(np.asarray(out.input_token_ids, np.int64), self._last_sampled.astype(np.int64))
                and not np.isin(spec.req_ids, np.asarray(out.finished_ids)).any())

    def _eager_bucket(self, T: int) -> int:
        for size in self.eager_buckets:
            if size >= T:
                return size
        return T

    @torch.inference_mode()
    def _warm_eager_shapes(self, kv_caches: list[torch.Tensor]) -> None:
        """One eager forward per token bucket (no KV writes: every slot is -1), so that cuBLAS's
        first call for each GEMM shape is paid here and not in a request's first token."""
        inner = self.graph_model.inner if self.graph_model is not None else self.model
        self.block_tables_buf.zero_()
        max_len = max(self.block_size, min(2048, self.block_tables_buf.shape[1] * self.block_size))
        for T in self.eager_buckets:
            lens = [max_len] * (T // max_len) + ([T % max_len] if T % max_len else [])
            B = len(lens)
            if B > self.seq_lens_buf.shape[0]:
                continue                                # no step of this size can be scheduled
            self.input_ids_buf[:T].zero_()
            self.positions_buf[:T].zero_()
            self.slot_mapping_buf[:T].fill_(-1)
            self.query_start_loc_buf[:B + 1].copy_(torch.tensor(np.cumsum([0] + lens), dtype=torch.int32))
            self.seq_lens_buf[:B].copy_(torch.tensor(lens, dtype=torch.int32))
            width = -(-max(lens) // self.block_size)
            md = AttentionMetadata(slot_mapping=self.slot_mapping_buf[:T],
                                   query_start_loc=self.query_start_loc_buf[:B + 1], seq_lens=self.seq_lens_buf[:B],
                                   block_tables=self.block_tables_buf[:B, :width], num_decodes=0,
                                   max_query_len=max(lens), max_seq_len=max(lens))
            inner(self.input_ids_buf[:T], self.positions_buf[:T], kv_caches, md)
        self._synchronize(self.device)

    def _prepare(self, fb: FlatBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        if self.step_timer is not None:
            self.step_timer.device_begin()
        T, B = fb.input_ids.shape[0], fb.seq_lens.shape[0]
        width = max(-(-fb.max_seq_len // self.block_size), 1)
        # A decode batch that a graph will replay is padded here, in the same copies, with padding
        # requests; any other step is padded with padding tokens (slot -1) to its token bucket.
        bs, pad_reqs = T, False
        if self.graph_model is not None and fb.num_decodes == B == T and T > 0 and self.graph_model._bucket(T):
            bs = self.graph_model._bucket(T)
            pad_reqs = bs > T
        elif self.eager_buckets and T > 0:
            bs = self._eager_bucket(T)
        if self._staged is not None:
            self._staged.synchronize()          # the previous step's copies have left the pinned buffers
        n64, n32 = self._np64, self._np32
        n64[:T], n64[bs:bs + T], n64[2 * bs:2 * bs + T] = fb.input_ids, fb.positions, fb.slot_mapping
        n64[T:bs], n64[bs + T:2 * bs], n64[2 * bs + T:3 * bs] = 0, 0, -1    # padding: no KV write
        Bp = bs if pad_reqs else B
        n32[:B + 1] = fb.query_start_loc
        n32[B + 1:Bp + 1] = np.arange(B + 1, Bp + 1, dtype=np.int32)        # one token per padding request
        n32[Bp + 1:Bp + 1 + B] = fb.seq_lens
        n32[Bp + 1 + B:2 * Bp + 1] = 1
        off = 2 * Bp + 1
        bt = n32[off:off + B * width].reshape(B, width)
        bt[:] = fb.block_tables[:, :width]
        p64, p32 = self._pin64, self._pin32
        nb = dict(non_blocking=True)
        self.input_ids_buf[:bs].copy_(p64[:bs], **nb)
        self.positions_buf[:bs].copy_(p64[bs:2 * bs], **nb)
        self.slot_mapping_buf[:bs].copy_(p64[2 * bs:3 * bs], **nb)
        self.query_start_loc_buf[:Bp + 1].copy_(p32[:Bp + 1], **nb)
        self.seq_lens_buf[:Bp].copy_(p32[Bp + 1:2 * Bp + 1], **nb)
        self.block_tables_buf[:B, :width].copy_(p32[off:off + B * width].view(B, width), **nb)
        self._staged = self._event_cls()
        self._staged.record()
        self.padded_batch_size = bs if pad_reqs or bs == T else 0
        Tm = T if pad_reqs else bs                      # tokens the model sees
        md = AttentionMetadata(
            slot_mapping=self.slot_mapping_buf[:Tm], query_start_loc=self.query_start_loc_buf[:B + 1],
            seq_lens=self.seq_lens_buf[:B], block_tables=self.block_tables_buf[:B, :width],
            num_decodes=fb.num_decodes, max_query_len=fb.max_query_len, max_seq_len=fb.max_seq_len)
        return self.input_ids_buf[:Tm], self.positions_buf[:Tm], md
