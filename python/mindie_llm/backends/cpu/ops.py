# SPDX-License-Identifier: Apache-2.0
"""CPU op table: placeholder that reuses the reference ops (replaced by the fast path)."""
from mindie_llm.ops.reference import (fused_add_rms_norm, paged_attention, rms_norm,  # noqa: F401
                                      rotary_embedding, silu_and_mul, write_kv_cache)
