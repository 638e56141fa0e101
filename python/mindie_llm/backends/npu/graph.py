# SPDX-License-Identifier: Apache-2.0
"""NPUGraphDecodeModel: decode-only steps replayed from ACL graphs (``torch.npu.NPUGraph``), with
the interface of the CUDA backend's CudaGraphDecodeModel (the executor's GraphModelRunner drives
either): ``capture(kv_caches)``, ``replay(n)``, ``forward(...)``, ``compute_logits``, buckets of
batch sizes, padding rows with slot -1, the runner's persistent buffers.

Two NPU specifics, as in vllm-ascend:
- the step's attention plan (host lists, int32 tables) is built before capture, never inside it;
- ATB PagedAttention reads the context lengths on the host when it is launched, so each captured
  ``_npu_paged_attention`` is wrapped in ``graph_task_group_begin`` / ``graph_task_group_end``
  (attention.py does this when ``backend_state["npu_graph_tasks"]`` is a list) and, before every
  replay, re-issued with the step's lengths between ``graph_task_update_begin`` / ``_end``.

Imports torch, ops and this backend only: nothing above ``ops``.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch import nn

from mindie_llm.backends.npu import runtime
from mindie_llm.backends.npu.attention import build_plan
from mindie_llm.backends.platform import eager_token_buckets, graph_batch_sizes, stage_decode_inputs
from mindie_llm.ops.attention_metadata import AttentionMetadata

__all__ = ["NPUGraphDecodeModel", "graph_batch_sizes", "eager_token_buckets"]


class NPUGraphDecodeModel(nn.Module):
    """Wraps the model: ``forward`` replays a captured graph for decode-only batches, else runs the
    model eagerly; a graph holds the forward, the logits and their argmax."""

    batch_sizes_for = staticmethod(graph_batch_sizes)
    eager_token_buckets = staticmethod(eager_token_buckets)

    def __init__(self, model: nn.Module, runner: Any, batch_sizes: Sequence[int], num_kv_heads: int,
                 max_model_len: int) -> None:
        super().__init__()
        self.inner = model
        self.runner = runner
        self.batch_sizes = sorted(batch_sizes)
        self.num_kv_heads = num_kv_heads
        self.max_model_len = max_model_len
        self.graphs: dict[int, Any] = {}
        self.outputs: dict[int, torch.Tensor] = {}     # [bs, H]
        self.logits: dict[int, torch.Tensor] = {}      # [bs, V] float32
        self.greedy: dict[int, torch.Tensor] = {}      # [bs] int64
        self.tasks: dict[int, list] = {}               # bs -> captured paged-attention tasks
        self.num_replays = 0
        self._arange = torch.arange(max(self.batch_sizes) + 1, dtype=torch.int32, device=runner.device)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner.compute_logits(hidden)

    def _metadata(self, bs: int, tasks: list | None = None) -> AttentionMetadata:
        r = self.runner
        md = AttentionMetadata(
            slot_mapping=r.slot_mapping_buf[:bs], query_start_loc=r.query_start_loc_buf[:bs + 1],
            seq_lens=r.seq_lens_buf[:bs], block_tables=r.block_tables_buf[:bs], num_decodes=bs, max_query_len=1,
            max_seq_len=self.max_model_len)
        md.backend_state["npu_plan"] = build_plan(md)       # host work outside the graph
        if tasks is not None:
            md.backend_state["npu_graph_tasks"] = tasks
        return md

    def _pad(self, num_real: int, bs: int) -> None:
        r = self.runner
        r.query_start_loc_buf[:bs + 1].copy_(self._arange[:bs + 1])
        if bs > num_real:
            r.slot_mapping_buf[num_real:bs].fill_(-1)
            r.seq_lens_buf[num_real:bs].fill_(1)
            r.positions_buf[num_real:bs].zero_()
            r.input_ids_buf[num_real:bs].zero_()

    @torch.inference_mode()
    def capture(self, kv_caches: list[torch.Tensor]) -> float:
        """One graph per bucket, largest first, sharing one memory pool. Returns seconds."""
        npu = runtime.load().npu
        t0 = time.perf_counter()
        r = self.runner
        pool = npu.graph_pool_handle()
        r.block_tables_buf.zero_()
        for bs in sorted(self.batch_sizes, reverse=True):
            self._pad(0, bs)
            args = (r.input_ids_buf[:bs], r.positions_buf[:bs], kv_caches)
            self.inner(*args, self._metadata(bs))          # warm-up (workspaces, tiling caches)
            npu.synchronize()
            graph, tasks = npu.NPUGraph(), []
            md = self._metadata(bs, tasks)
            with npu.graph(graph, pool=pool):
                hidden = self.inner(*args, md)
                logits = self.inner.compute_logits(hidden)
                greedy = torch.argmax(logits, dim=-1)
            self.graphs[bs], self.tasks[bs] = graph, tasks
            self.outputs[bs], self.logits[bs], self.greedy[bs] = hidden, logits, greedy
        npu.synchronize()
        return time.perf_counter() - t0

    def _bucket(self, n: int) -> int | None:
        for bs in self.batch_sizes:
            if bs >= n:
                return bs if bs in self.graphs else None
        return None

    def _update_tasks(self, bs: int) -> None:
        """Re-issues each captured paged-attention task with the step's context lengths."""
        tnpu = runtime.load()
        lens = self.runner.seq_lens_buf[:bs].to("cpu", torch.int32, copy=True)     # host, as ATB reads it
        stream = tnpu.npu.current_stream()
        for task in self.tasks[bs]:
            tnpu.npu.graph_task_update_begin(stream, task["handle"])
            kwargs = dict(task["kwargs"], context_lens=lens)
            tnpu._npu_paged_attention(**kwargs)
            tnpu.npu.graph_task_update_end(stream)

    def replay(self, n: int) -> int:
        """Replays the bucket of a decode batch of ``n`` whose inputs the runner has staged (padded)."""
        bs = self._bucket(n)
        assert bs is not None and self.runner.padded_batch_size == bs, (n, bs, self.runner.padded_batch_size)
        self.runner.padded_batch_size = 0
        self._update_tasks(bs)
        self.graphs[bs].replay()
        self.num_replays += 1
        return bs

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: Any) -> torch.Tensor:
        n = input_ids.shape[0]
        bs = self._bucket(n) if (attn_metadata.num_decodes == n == attn_metadata.num_reqs and n > 0) else None
        if bs is None or runtime.load().npu.is_current_stream_capturing():
            return self.inner(input_ids, positions, kv_caches, attn_metadata)
        r = self.runner
        stage_decode_inputs(r, input_ids, positions, attn_metadata)
        if r.padded_batch_size != bs:
            self._pad(n, bs)
        r.padded_batch_size = 0
        self._update_tasks(bs)
        self.graphs[bs].replay()
        self.num_replays += 1
        return self.outputs[bs][:n]
