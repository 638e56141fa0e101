# SPDX-License-Identifier: Apache-2.0
"""The op table of the CUDA backend: what ``ops.register_backend("cuda", this module)`` routes to.

Every name here has the signature of the same op in ``mindie_llm.ops`` (reference semantics in
``ops/reference.py``); GEMMs stay in torch (cuBLAS is at the floor). ``rotary_embedding_write_kv``
is the fused form of rotary + KV write, for callers that can use it. The ``*_quant`` entries serve a
quantized (int8 / fp8 e4m3) KV cache; ``fp8_matmul`` is ``torch._scaled_mm`` (compute capability
8.9 or newer). Imports triton (through the
kernel modules); must not import models, layers or executor.
"""
from __future__ import annotations

from mindie_llm.backends.cuda.activation import silu_and_mul
from mindie_llm.backends.cuda.attention import paged_attention
from mindie_llm.backends.cuda.norm import fused_add_rms_norm, rms_norm
from mindie_llm.backends.cuda.quant_kv import (paged_attention_quant, rotary_embedding_write_kv_quant,
                                               write_kv_cache_quant)
from mindie_llm.backends.cuda.quant_linear import fp8_matmul, w4a16_matmul, w8a8_matmul
from mindie_llm.backends.cuda.rotary import rotary_embedding, rotary_embedding_write_kv, write_kv_cache

__all__ = ["rms_norm", "fused_add_rms_norm", "rotary_embedding", "write_kv_cache", "paged_attention",
           "silu_and_mul", "rotary_embedding_write_kv", "w8a8_matmul", "w4a16_matmul", "fp8_matmul",
           "write_kv_cache_quant", "rotary_embedding_write_kv_quant", "paged_attention_quant"]
