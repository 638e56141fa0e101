# SPDX-License-Identifier: Apache-2.0
"""Worker: one rank's device, model shard, KV cache and model runner.

A worker is built from the deployment config alone (plus, for tests and benchmarks, weights that
are already loaded); after construction it only ever receives step messages (``execute``). What the
engine needs to configure the scheduler (block count, model shape, tokenizer) is in ``info``.

Must not import the engine, the scheduler extension or the server.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from mindie_llm.config import EngineConfig
from mindie_llm.contract import ModelRunnerOutput, SchedulerOutput

__all__ = ["Worker", "WorkerInfo"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker tells the engine once it is ready."""

    arch: Any                    # models.config.ModelArchConfig of the loaded model
    tokenizer: Any               # tokenizer.Tokenizer or None (dummy weights)
    model_name: str
    num_kv_blocks: int           # KV blocks this rank holds (block 0 = the null block)
    max_model_len: int
    block_size: int


class Worker:
    """Loads the model on this rank's device, sizes and allocates the KV cache, builds the runner."""

    def __init__(self, config: EngineConfig, *, rank: int = 0, loaded_model: Any = None,
                 parallel: Any = None, local_world_size: int | None = None) -> None:
        # local_world_size: ranks on this node (default LOCAL_WORLD_SIZE, else 1); ranks that share
        # a device split cache.gpu_memory_utilization
        from mindie_llm.backends import get_platform, import_qualname
        from mindie_llm.executor.kv_cache import KVCacheSpec, allocate_kv_caches, resolve_kv_cache_dtype
        from mindie_llm.executor.model_runner import ModelRunner
        from mindie_llm.loader import load_model, resolve_dtype

        platform = get_platform(config.backend.device)
        config = platform.check_and_update_config(config)
        self.rank = rank
        self.platform = platform
        local_rank = int(os.environ.get("LOCAL_RANK", rank))     # a multi-node launch sets it
        self.device = device = platform.rank_device(local_rank)                # cuda:LOCAL_RANK
        if local_world_size is None:
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        share = platform.ranks_sharing_device(local_rank, local_world_size)
        if share > 1 and not config.cache.num_blocks:
            # ranks sharing one card split its memory fraction (each sizes its KV pool from its share)
            util = config.cache.gpu_memory_utilization / share
            logger.info("rank %d shares %s with %d other rank(s): cache.gpu_memory_utilization %.3f each",
                        rank, device, share - 1, util)
            config = config.replace(cache=dataclasses.replace(config.cache, gpu_memory_utilization=util))
        if config.backend.num_threads and device.type == "cpu":
            torch.set_num_threads(config.backend.num_threads)
        from mindie_llm.distributed.parallel_state import ParallelContext
        from mindie_llm.layers.linear import kv_heads_per_rank

        # tensor parallelism: this rank's shard of the weights and of the KV heads
        self.parallel = parallel = parallel if parallel is not None else ParallelContext.single()
        loaded = loaded_model or load_model(config.model, device, config.model.dtype, parallel=parallel)
        self.model = loaded.model
        arch = loaded.arch

        max_len = config.model.max_seq_len or arch.max_position_embeddings
        if not config.scheduler.enable_chunked_prefill:
            max_len = min(max_len, config.scheduler.max_prefill_tokens)
        self.config = config.replace(model=dataclasses.replace(config.model, max_seq_len=max_len))
        block_size = config.cache.cache_block_size
        cache_dtype = config.cache.cache_dtype
        kv_dtype = resolve_kv_cache_dtype(cache_dtype, resolve_dtype(
            cache_dtype if cache_dtype in ("float32", "bfloat16", "float16") else config.model.dtype, device, arch),
            device)
        spec = KVCacheSpec(arch.num_hidden_layers, kv_heads_per_rank(arch.num_key_value_heads, parallel.size),
                           arch.head_dim, block_size, kv_dtype)
        sc = config.scheduler
        if not config.cache.num_blocks and platform.profiles_activation_peak:
            from mindie_llm.executor.profile_run import max_step   # KV sized from the profiled peak
            platform.profile_activation_peak(max_step(
                self.model, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                block_size=block_size, kv_dtype=kv_dtype, device=device,
                max_num_batched_tokens=sc.max_prefill_tokens, max_num_seqs=sc.max_batch_size,
                vocab_size=arch.vocab_size))
        num_blocks = int(config.cache.num_blocks or platform.num_kv_blocks(config.cache, spec.bytes_per_block))
        num_blocks = parallel.all_reduce_min(num_blocks)      # every rank holds the same block ids
        self.kv_caches = allocate_kv_caches(spec, num_blocks, device)
        runner_cls = platform.model_runner_cls()
        runner_cls = import_qualname(runner_cls) if runner_cls else ModelRunner
        model = self.model
        if config.parallel.micro_batch_overlap and parallel.size > 1:
            from mindie_llm.distributed.micro_batch import OverlappedModel
            model = OverlappedModel(model)      # two micro-batches, all-reduces overlapped
        runner_kwargs = platform.runner_kwargs(config)
        if runner_kwargs.get("enable_cuda_graph") and not parallel.graph_capturable:
            # a gloo group's collectives run on the host: no device graph can hold them
            logger.info("device graphs off: the tensor-parallel group is %s (not capturable); eager steps",
                        parallel.backend)
            runner_kwargs["enable_cuda_graph"] = False
        extra = dict(async_scheduling=True) if sc.async_scheduling else {}   # the runner queues step n+1 ahead
        self.runner = runner_cls(model, arch.vocab_size, self.kv_caches, block_size=block_size,
                                 max_num_seqs=sc.max_batch_size, max_num_batched_tokens=sc.max_prefill_tokens,
                                 max_model_len=max_len, device=device, **extra, **runner_kwargs)
        from mindie_llm.spec_decode.speculator import make_speculator

        self.speculator = make_speculator(self.config, target_model=self.model, device=device,
                                          block_size=block_size, max_model_len=max_len)
        self.info = WorkerInfo(arch=arch, tokenizer=loaded.tokenizer,
                               model_name=config.model.served_model_name or loaded.name,
                               num_kv_blocks=num_blocks, max_model_len=max_len, block_size=block_size)

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        if self.speculator is None:
            return self.runner.execute(out)
        self.runner.last_step = None
        res = self.runner.execute(out)
        self.speculator.after_step(out, res, self.runner)   # fills res.draft_* for the next step
        return res
