# SPDX-License-Identifier: Apache-2.0
"""One Llama-family implementation: Llama 2/3 (llama3 rope scaling), Mistral (sliding window),
Qwen2 (qkv bias) and SmolLM2; MHA, GQA and MQA by config; tied or untied embeddings.

Device-agnostic: every fused step goes through mindie_llm.ops via the layers. The model sees the
flat mixed batch of docs/architecture.md. Must not import the engine, executor, loader, tokenizer
or any backend.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from mindie_llm.distributed.parallel_state import ParallelContext
from mindie_llm.layers.activation import get_act_and_mul
from mindie_llm.layers.attention import Attention, AttentionMetadata
from mindie_llm.layers.embedding import LMHead, VocabEmbedding
from mindie_llm.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                     load_checkpoint_tensor)
from mindie_llm.layers.norm import RMSNorm
from mindie_llm.layers.rotary import get_rope
from mindie_llm.models.config import LlamaArchConfig

__all__ = ["LlamaForCausalLM", "LlamaModel", "UnknownWeightError"]


class UnknownWeightError(ValueError):
    """A checkpoint tensor has no place in the model."""

    def __init__(self, name: str):
        self.tensor = name
        super().__init__(f"{name}: checkpoint tensor has no matching model parameter")


class LlamaMLP(nn.Module):
    def __init__(self, arch: LlamaArchConfig, parallel: ParallelContext | None = None):
        super().__init__()
        i = arch.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(arch.hidden_size, [i, i], bias=arch.mlp_bias,
                                                       parallel=parallel)
        self.down_proj = RowParallelLinear(i, arch.hidden_size, bias=arch.mlp_bias, parallel=parallel)
        self.act_fn = get_act_and_mul(arch.hidden_act)

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        # [T, H] -> [T, 2I/N] -> [T, I/N] -> [T, H] (a partial sum when reduce is False)
        return self.down_proj(self.act_fn(self.gate_up_proj(x)), reduce=reduce)


class LlamaAttention(nn.Module):
    def __init__(self, arch: LlamaArchConfig, layer_idx: int, parallel: ParallelContext | None = None):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(arch.hidden_size, arch.head_dim, arch.num_attention_heads,
                                          arch.num_key_value_heads, bias=arch.qkv_bias, parallel=parallel)
        self.q_size = self.qkv_proj.q_size      # local (this rank's) sizes
        self.kv_size = self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(arch.q_size, arch.hidden_size, bias=arch.o_bias, parallel=parallel)
        self.rotary_emb = get_rope(arch.head_dim, arch.rotary_dim, arch.max_position_embeddings,
                                   arch.rope_theta, arch.rope_scaling, is_neox=True)
        self.attn = Attention(self.qkv_proj.num_heads, arch.head_dim, arch.head_dim ** -0.5,
                              self.qkv_proj.num_kv_heads, arch.sliding_window_of(layer_idx))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata, reduce: bool = True) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)                                         # [T, (Hq + 2Hk) * D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # rotary + KV write fused in one op (q, k may be rotated in place)
        out = self.attn(q, k, v, kv_cache, attn_metadata, positions, self.rotary_emb)  # [T, Hq*D]
        return self.o_proj(out, reduce=reduce)                              # [T, H]


class LlamaDecoderLayer(nn.Module):
    """``forward`` = ``attn_stage`` -> all-reduce -> ``mlp_stage`` -> all-reduce; the stages return
    partial sums so that a micro-batch schedule can overlap each all-reduce with other work."""

    def __init__(self, arch: LlamaArchConfig, layer_idx: int, parallel: ParallelContext | None = None):
        super().__init__()
        self.self_attn = LlamaAttention(arch, layer_idx, parallel)
        self.mlp = LlamaMLP(arch, parallel)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def attn_stage(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                   kv_cache: torch.Tensor, attn_metadata: AttentionMetadata
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(partial attention output [T, H], residual [T, H]); the caller all-reduces the first."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        return self.self_attn(positions, hidden, kv_cache, attn_metadata, reduce=False), residual

    def mlp_stage(self, hidden: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(partial MLP output [T, H], residual [T, H]) from the reduced attention output."""
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden, reduce=False), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: LlamaArchConfig, parallel: ParallelContext | None = None):
        super().__init__()
        self.parallel = parallel if parallel is not None else ParallelContext.single()
        self.embed_tokens = VocabEmbedding(arch.vocab_size, arch.hidden_size, parallel)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, i, parallel) for i in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)                               # [T, H]
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden                                                       # [T, H]

    def forward_micro_batches(self, batches: list[tuple[torch.Tensor, torch.Tensor, AttentionMetadata]],
                              kv_caches: list[torch.Tensor]) -> list[torch.Tensor]:
        """The same computation as ``forward`` for each (input_ids, positions, metadata) micro-batch,
        interleaved so that one micro-batch's all-reduce runs while the next one computes (the
        schedule is ``distributed.micro_batch.run_interleaved``). Returns each one's hidden [T_m, H]."""
        from mindie_llm.distributed.micro_batch import run_interleaved

        def stages(ids: torch.Tensor, pos: torch.Tensor, md: AttentionMetadata):
            yield lambda _h, _r: (self.embed_tokens(ids, reduce=False), None)
            for layer, kv_cache in zip(self.layers, kv_caches):
                yield lambda h, r, layer=layer, kv=kv_cache: layer.attn_stage(pos, h, r, kv, md)
                yield lambda h, r, layer=layer: layer.mlp_stage(h, r)

        outs = run_interleaved([stages(*b) for b in batches], self.parallel)
        return [self.norm(h, r)[0] for h, r in outs]


# HF checkpoint name fragment -> (stacked parameter fragment, shard id)
_STACKED = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)


class LlamaForCausalLM(nn.Module):
    """``hidden = model(input_ids[T], positions[T], kv_caches, attn_metadata)`` -> [T, H];
    ``logits = model.compute_logits(hidden[S, H])`` -> [S, V] float32."""

    def __init__(self, arch: LlamaArchConfig, parallel: ParallelContext | None = None):
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch, parallel)
        tie = self.model.embed_tokens if arch.tie_word_embeddings else None
        self.lm_head = LMHead(arch.vocab_size, arch.hidden_size, tie_to=tie, parallel=parallel)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def forward_micro_batches(self, batches: list[tuple[torch.Tensor, torch.Tensor, AttentionMetadata]],
                              kv_caches: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.model.forward_micro_batches(batches, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [S, H] -> [S, V] float32

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads HF-named tensors; returns the names of the parameters that were filled.
        Raises UnknownWeightError for a tensor with no place, ValueError naming a shape mismatch."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if self.arch.tie_word_embeddings and name == "lm_head.weight":
                continue  # tied: the embedding is the head
            target, shard = name, None
            for frag, stacked, shard_id in _STACKED:
                if frag in name:
                    target, shard = name.replace(frag, stacked), shard_id
                    break
            param = params.get(target)
            if param is None:
                raise UnknownWeightError(name)
            load_checkpoint_tensor(name, param, tensor, shard)
            loaded.add(target)
        return loaded

    def missing_parameters(self, loaded: set[str]) -> list[str]:
        names = [n for n, _ in self.named_parameters()]  # tied weights appear once
        return [n for n in names if n not in loaded]
