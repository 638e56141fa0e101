# SPDX-License-Identifier: Apache-2.0
"""``Platform``: what a device backend tells the rest of the system (vLLM-style class attributes
and classmethods): its device type, collective library, op module (a qualname, imported lazily),
default dtype, KV-cache sizing, synchronization and graph-capture wrapper.

Must not import models, layers, the engine or executor; imports ops only to register a backend.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch

__all__ = ["Platform", "kv_cache_bytes_per_block", "import_qualname", "graph_batch_sizes", "eager_token_buckets",
           "stage_decode_inputs"]


def import_qualname(qualname: str) -> Any:
    """"pkg.module.Name" -> the object (lazy imports of device modules)."""
    module, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module), name)


def kv_cache_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                             dtype: torch.dtype) -> int:
    """Bytes of one KV block across all layers: K and V of ``block_size`` tokens."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """Decode-graph buckets of every graph-capturing platform: 1, 2, 4, 8, then every 8 up to 64
    and every 16 beyond, capped at ``max_batch_size``."""
    sizes = [1, 2, 4] + list(range(8, 65, 8)) + list(range(80, 1025, 16))
    return sorted({s for s in sizes if s < max_batch_size} | {max_batch_size})


def eager_token_buckets(max_tokens: int) -> list[int]:
    """Token counts eager steps are padded to (16, 32, 64, every 64 to 1024, every 256 beyond): a
    few GEMM shapes, each warmed at start-up, instead of one new shape per step."""
    sizes = [16, 32] + list(range(64, 1025, 64)) + list(range(1280, max_tokens + 256, 256))
    return sorted({s for s in sizes if s < max_tokens} | {max_tokens})


def stage_decode_inputs(runner: Any, input_ids: torch.Tensor, positions: torch.Tensor, md: Any) -> None:
    """Copies a decode batch's inputs into the runner's persistent buffers that a captured graph
    reads, skipping tensors that already are those buffers (the runner's own step)."""
    n = input_ids.shape[0]
    for src, buf in ((input_ids, runner.input_ids_buf), (positions, runner.positions_buf),
                     (md.slot_mapping, runner.slot_mapping_buf), (md.seq_lens, runner.seq_lens_buf)):
        if src.data_ptr() != buf.data_ptr():
            buf[:n].copy_(src)
    bt = md.block_tables
    if bt.data_ptr() != runner.block_tables_buf.data_ptr() or bt.stride(0) != runner.block_tables_buf.stride(0):
        runner.block_tables_buf[:n, :bt.shape[1]].copy_(bt)


class Platform:
    device_type: str = "cpu"
    dist_backend: str = "gloo"          # gloo | nccl | hccl
    ops_module: str | None = None       # qualname of the module registered with ops.register_backend
    model_runner: str | None = None     # qualname of a ModelRunner subclass, None = the default one
    profiles_activation_peak: bool = False  # True: size the KV cache after a profiled max-size step

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def device(cls, index: int = 0) -> torch.device:
        return torch.device(cls.device_type) if cls.device_type == "cpu" else torch.device(cls.device_type, index)

    @classmethod
    def rank_device(cls, local_rank: int) -> torch.device:
        """The device of the tensor-parallel rank ``local_rank`` of this node: device
        ``local_rank``, or, with fewer devices than local ranks, ``local_rank % count`` (ranks share
        a card: gloo can, NCCL refuses it with its own error)."""
        if cls.device_type == "cpu":
            return torch.device("cpu")
        count = getattr(torch, cls.device_type).device_count()
        return cls.device(local_rank % count if count else local_rank)

    @classmethod
    def ranks_sharing_device(cls, local_rank: int, local_world_size: int) -> int:
        """How many of this node's ``local_world_size`` ranks ``rank_device`` puts on
        ``local_rank``'s device (1 on the CPU: host memory is sized by ``kv_cache_memory_gb``)."""
        if cls.device_type == "cpu" or local_world_size <= 1:
            return 1
        count = getattr(torch, cls.device_type).device_count() or 1
        return sum(1 for r in range(local_world_size) if r % count == local_rank % count)

    @classmethod
    def default_dtype(cls) -> torch.dtype:
        return torch.float32

    @classmethod
    def synchronize(cls) -> None:
        return None

    @classmethod
    def graph_wrapper_cls(cls) -> type | None:
        """The class that captures and replays decode steps as graphs; None if the device has none."""
        return None

    @classmethod
    def model_runner_cls(cls) -> str | None:
        return cls.model_runner

    @classmethod
    def runner_kwargs(cls, config: Any) -> dict[str, Any]:
        """Extra keyword arguments of this platform's model runner, from the deployment."""
        return {}

    @classmethod
    def profile_activation_peak(cls, run_step: Any) -> int:
        """Runs the largest step and records its activation peak (bytes) for KV sizing; only
        platforms with ``profiles_activation_peak`` are asked to."""
        return 0

    @classmethod
    def register_ops(cls) -> None:
        """Routes mindie_llm.ops calls on this device to ``ops_module`` (idempotent)."""
        if cls.ops_module is None:
            return
        from mindie_llm import ops

        ops.register_backend(cls.device_type, importlib.import_module(cls.ops_module))

    @classmethod
    def available_kv_cache_bytes(cls, cache_config: Any) -> int:
        raise NotImplementedError  # each platform sizes its own memory

    @classmethod
    def num_kv_blocks(cls, cache_config: Any, bytes_per_block: int) -> int:
        """Blocks in the KV pool, block 0 (the null block) included: ``cache.num_blocks`` if set,
        else the platform's memory budget divided by ``bytes_per_block``."""
        if bytes_per_block <= 0:
            raise ValueError(f"bytes_per_block must be > 0; got {bytes_per_block}")
        if getattr(cache_config, "num_blocks", None):
            return int(cache_config.num_blocks)
        blocks = int(cls.available_kv_cache_bytes(cache_config) // bytes_per_block)
        if blocks < 2:
            raise ValueError(f"cache: the memory budget holds {blocks} KV block(s) of {bytes_per_block} "
                             "bytes; at least 2 are needed (raise the budget or lower cache_block_size)")
        return blocks

    @classmethod
    def check_and_update_config(cls, config: Any) -> Any:
        """Adjusts an EngineConfig for this device (returns it, possibly replaced)."""
        return config
