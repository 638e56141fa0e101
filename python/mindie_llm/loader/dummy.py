# SPDX-License-Identifier: Apache-2.0
"""Dummy weights: random tensors of any architecture, for benchmarks. Named shapes cover the
models of the benchmark issues; any HF config dict works too."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["NAMED_SHAPES", "named_shape", "init_dummy_weights"]

NAMED_SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=128000, eos_token_id=128001),
    "llama3.2-1b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048,
                        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                        bos_token_id=128000, eos_token_id=128001),
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2),
}


def named_shape(name: str) -> dict[str, Any] | None:
    return dict(NAMED_SHAPES[name]) if name in NAMED_SHAPES else None


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Fills every parameter with small random values (norm weights near 1) so that activations
    stay finite through many layers. Generated in float32 on the parameter's device (one generator
    per device, seeded with ``seed``) in chunks, then copied: the same seed gives the same weights
    on the same device type, not across device types."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        dev = p.device
        gen = gens.get(dev)
        if gen is None:
            gen = gens[dev] = torch.Generator(device=dev).manual_seed(seed)
        if p.dim() == 1:
            vals = 1.0 + 0.02 * torch.randn(p.shape, generator=gen, device=dev) if "norm" in name else \
                0.02 * torch.randn(p.shape, generator=gen, device=dev)
            p.data.copy_(vals.to(p.dtype))
            continue
        std = 1.0 / math.sqrt(p.shape[-1])
        rows = max(1, (1 << 24) // max(1, p.shape[-1]))
        for start in range(0, p.shape[0], rows):
            chunk = p.data[start:start + rows]
            chunk.copy_((torch.randn(chunk.shape, generator=gen, device=dev) * std).to(p.dtype))
