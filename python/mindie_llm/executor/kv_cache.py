# SPDX-License-Identifier: Apache-2.0
"""The paged KV cache: one tensor per layer, ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(index 0 = K, 1 = V), and the block count derived from a memory budget.

Block 0 is the scheduler's null block: padded block-table entries point at it and it is never
read for a real token. Must not import the engine or the scheduler.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mindie_llm.backends.platform import kv_cache_bytes_per_block
from mindie_llm.ops.reference import KV_QUANT_DTYPES, KV_SCALE_BYTES

__all__ = ["KVCacheSpec", "resolve_kv_cache_dtype", "bytes_per_block", "allocate_kv_caches", "num_blocks_for_budget"]


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def entry_width(self) -> int:
        """Last dimension of the cache tensor: head_dim, plus the 4 bytes of each head's scale in a
        quantized cache (int8 / fp8 e4m3, see ``ops/reference.py``)."""
        return self.head_dim + (KV_SCALE_BYTES if self.dtype in KV_QUANT_DTYPES else 0)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers (K and V): the platforms' one formula."""
        return kv_cache_bytes_per_block(self.num_layers, self.block_size, self.num_kv_heads, self.entry_width,
                                        self.dtype)


_QUANT_KV = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn, "fp8": torch.float8_e4m3fn}


def resolve_kv_cache_dtype(cache_dtype: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """``cache.cache_dtype`` -> the cache tensor's dtype ("auto" = the model's). A quantized cache
    (int8, fp8_e4m3) is read by the reference attention ops on the CPU and by the Triton kernels of
    the CUDA backend (fp8 there needs compute capability 8.9 or newer); other devices refuse it."""
    if cache_dtype not in _QUANT_KV:
        return model_dtype
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"cache.cache_dtype={cache_dtype}: a quantized KV cache runs on the CPU and CUDA backends "
                         f"only so far (no {dev.type} attention kernel reads it yet)")
    if dev.type == "cuda" and _QUANT_KV[cache_dtype] == torch.float8_e4m3fn:
        cap = torch.cuda.get_device_capability(dev)
        if cap < (8, 9):
            raise ValueError(f"cache.cache_dtype={cache_dtype}: an fp8 KV cache needs a GPU of compute capability "
                             f"8.9 or newer (this one is {cap[0]}.{cap[1]}); use int8")
    return _QUANT_KV[cache_dtype]


def bytes_per_block(spec: KVCacheSpec) -> int:
    return spec.bytes_per_block


def num_blocks_for_budget(spec: KVCacheSpec, budget_bytes: int) -> int:
    """How many blocks fit in ``budget_bytes`` (at least 2: the null block and one real one)."""
    return max(int(budget_bytes // spec.bytes_per_block), 2)


def allocate_kv_caches(spec: KVCacheSpec, num_blocks: int, device: torch.device | str) -> list[torch.Tensor]:
    """Zeroed caches, one per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]."""
    assert num_blocks >= 2, num_blocks
    shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.entry_width)
    return [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
