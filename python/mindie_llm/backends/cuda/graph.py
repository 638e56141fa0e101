# SPDX-License-Identifier: Apache-2.0
"""CUDA graphs for decode batches: ``CudaGraphDecodeModel`` captures one graph per batch bucket at
start-up and replays the smallest bucket that holds a decode-only batch; the rows past the real
batch are padding (slot -1: no KV write; one-token context; outputs ignored). A graph holds the
forward, the logits of every row and their argmax (greedy tokens), so a greedy decode step is one
replay and one copy to the host. The graphs run on the runner's persistent device buffers
(``input_ids_buf``, ``positions_buf``, ``slot_mapping_buf``, ``query_start_loc_buf``,
``seq_lens_buf``, ``block_tables_buf``, ``padded_batch_size``), read through the ``buffers`` object
it is given.

The platform hands this class to the executor's graph runner (``Platform.graph_wrapper_cls``).
Imports torch, ops and this backend's kernels only: nothing above ``ops``.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch import nn

from mindie_llm.backends.cuda.sampling import argmax as gpu_argmax
from mindie_llm.backends.platform import eager_token_buckets, graph_batch_sizes, stage_decode_inputs
from mindie_llm.ops.attention_metadata import AttentionMetadata

__all__ = ["CudaGraphDecodeModel", "graph_batch_sizes", "eager_token_buckets"]


class CudaGraphDecodeModel(nn.Module):
    """Wraps the model: ``forward`` replays a captured graph for decode-only batches, else runs the
    model eagerly. A graph holds the forward, the logits of every row and their argmax (greedy
    tokens), so that a greedy decode step is one replay and one copy to the host."""

    # Bucket rules the runner asks the wrapper for (one place for both).
    batch_sizes_for = staticmethod(graph_batch_sizes)
    eager_token_buckets = staticmethod(eager_token_buckets)

    def __init__(self, model: nn.Module, runner: Any, batch_sizes: Sequence[int],
                 num_kv_heads: int, max_model_len: int) -> None:
        super().__init__()
        self.inner = model
        self.runner = runner
        self.batch_sizes = sorted(batch_sizes)
        self.num_kv_heads = num_kv_heads
        self.max_model_len = max_model_len
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}     # [bs, H] hidden states
        self.logits: dict[int, torch.Tensor] = {}      # [bs, V] float32
        self.greedy: dict[int, torch.Tensor] = {}      # [bs] int64 argmax of the logits
        self.num_replays = 0
        dev = runner.device
        self._arange = torch.arange(max(self.batch_sizes) + 1, dtype=torch.int32, device=dev)
        sm = torch.cuda.get_device_properties(dev).multi_processor_count
        self._split_below = 2 * sm                   # split-KV while B * Hk programs underfill the GPU

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner.compute_logits(hidden)

    def _metadata(self, bs: int) -> AttentionMetadata:
        r = self.runner
        return AttentionMetadata(
            slot_mapping=r.slot_mapping_buf[:bs], query_start_loc=r.query_start_loc_buf[:bs + 1],
            seq_lens=r.seq_lens_buf[:bs], block_tables=r.block_tables_buf[:bs], num_decodes=bs, max_query_len=1,
            max_seq_len=self.max_model_len,
            backend_state={"cuda_split_kv": bs * self.num_kv_heads < self._split_below})

    def _pad(self, num_real: int, bs: int) -> None:
        r = self.runner
        r.query_start_loc_buf[:bs + 1].copy_(self._arange[:bs + 1])   # decode-only: one token each
        if bs > num_real:
            r.slot_mapping_buf[num_real:bs].fill_(-1)                   # padding rows write no KV
            r.seq_lens_buf[num_real:bs].fill_(1)
            r.positions_buf[num_real:bs].zero_()
            r.input_ids_buf[num_real:bs].zero_()

    @torch.inference_mode()
    def capture(self, kv_caches: list[torch.Tensor]) -> float:
        """Captures one graph per bucket, largest first, sharing one memory pool. Returns seconds."""
        t0 = time.perf_counter()
        r = self.runner
        pool = torch.cuda.graph_pool_handle()
        r.block_tables_buf.zero_()
        for bs in sorted(self.batch_sizes, reverse=True):
            self._pad(0, bs)
            md = self._metadata(bs)
            args = (r.input_ids_buf[:bs], r.positions_buf[:bs], kv_caches, md)
            for _ in range(2):                   # compiles the kernels, creates cuBLAS workspaces
                self.inner(*args)
            torch.cuda.synchronize(r.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.inner(*args)                       # [bs, H]
                logits = self.inner.compute_logits(hidden)       # [bs, V] float32
                greedy = gpu_argmax(logits)                      # [bs] int64, as torch.argmax
            self.graphs[bs] = graph
            self.outputs[bs] = hidden
            self.logits[bs] = logits
            self.greedy[bs] = greedy
        torch.cuda.synchronize(r.device)
        return time.perf_counter() - t0

    def _bucket(self, n: int) -> int | None:
        for bs in self.batch_sizes:
            if bs >= n:
                return bs if bs in self.graphs else None
        return None

    def replay(self, n: int) -> int:
        """Replays the bucket of a decode batch of ``n`` whose inputs the runner has staged (padded)."""
        bs = self._bucket(n)
        assert bs is not None and self.runner.padded_batch_size == bs, (n, bs, self.runner.padded_batch_size)
        self.runner.padded_batch_size = 0
        self.graphs[bs].replay()
        self.num_replays += 1
        return bs

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        n = input_ids.shape[0]
        bs = self._bucket(n) if (attn_metadata.num_decodes == n == attn_metadata.num_reqs and n > 0) else None
        if bs is None or torch.cuda.is_current_stream_capturing():
            return self.inner(input_ids, positions, kv_caches, attn_metadata)
        r = self.runner
        stage_decode_inputs(r, input_ids, positions, attn_metadata)
        if r.padded_batch_size != bs:
            self._pad(n, bs)
        r.padded_batch_size = 0
        self.graphs[bs].replay()
        self.num_replays += 1
        return self.outputs[bs][:n]
