# SPDX-License-Identifier: Apache-2.0
"""EAGLE-style head: one decoder layer over the target's final hidden states, and its proposer.

The head (EAGLE-1 layout) predicts the target's next feature: at position t it takes
``fc(cat(embed(x[t+1]), f[t]))`` (f = the target's final-norm hidden state), runs one Llama
decoder layer without the input norm (attention over its own paged KV of the earlier positions,
then the post-attention norm and MLP, both residual) and gives f'[t+1]; the target's LM head turns
f'[t+1] into the logits of x[t+2]. A chain of k proposals feeds each predicted feature back in.
Embedding and LM head are the target's (not copied).

Checkpoints: a directory with ``config.json`` (optional: checked against the target, ``bias`` for
the fc layer) and ``*.safetensors`` holding the published EAGLE names ``fc.weight``,
``fc.bias``, ``layers.0.self_attn.{q,k,v,o}_proj.weight``, ``layers.0.mlp.{gate,up,down}_proj.weight``,
``layers.0.post_attention_layernorm.weight`` (``embed_tokens``/``input_layernorm`` are ignored;
pickle ``.bin`` files are refused). ``save_eagle_head`` writes the same names.

Must not import the engine, the executor or the server.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mindie_llm.layers.linear import load_checkpoint_tensor
from mindie_llm.layers.norm import RMSNorm
from mindie_llm.models.llama import LlamaAttention, LlamaMLP, UnknownWeightError
from mindie_llm.spec_decode.draft_cache import DraftKVCache, DraftRow
from mindie_llm.spec_decode.proposer import ProposalRequest, Proposer, draw_coupled

__all__ = ["EagleHead", "EagleProposer", "load_eagle_head", "save_eagle_head"]

_STACKED = {"q_proj": ("self_attn.qkv_proj", "q"), "k_proj": ("self_attn.qkv_proj", "k"),
            "v_proj": ("self_attn.qkv_proj", "v"), "gate_proj": ("mlp.gate_up_proj", 0),
            "up_proj": ("mlp.gate_up_proj", 1)}
_IGNORED = ("embed_tokens.weight", "layers.0.input_layernorm.weight", "lm_head.weight", "norm.weight")


class EagleHead(nn.Module):
    """f'[T, H] = head(embeds[T, H], features[T, H]) at ``positions``[T]."""

    def __init__(self, arch: Any, fc_bias: bool = True) -> None:
        super().__init__()
        self.arch = dataclasses.replace(arch, num_hidden_layers=1, layer_sliding_windows=None)
        H = arch.hidden_size
        self.fc = nn.Linear(2 * H, H, bias=fc_bias)
        self.self_attn = LlamaAttention(self.arch, 0)
        self.post_attention_layernorm = RMSNorm(H, arch.rms_norm_eps)
        self.mlp = LlamaMLP(self.arch)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], md: Any) -> torch.Tensor:
        x = self.fc(torch.cat([embeds, features.to(embeds.dtype)], dim=-1))          # [T, 2H] -> [T, H]
        h = self.self_attn(positions, x, kv_caches[0], md) + x
        return self.mlp(self.post_attention_layernorm(h)) + h                         # [T, H]

    def forward_dense(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Training form over one sequence [N, H] at positions 0..N-1: causal attention without a
        KV cache, differentiable (plain torch). Same function as ``forward``."""
        from mindie_llm.ops.reference import rotary_embedding

        a = self.self_attn
        x = self.fc(torch.cat([embeds, features], dim=-1))                            # [N, H]
        qkv = F.linear(x, a.qkv_proj.weight, getattr(a.qkv_proj, "bias", None))
        q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        pos = torch.arange(x.shape[0], device=x.device)
        q, k = rotary_embedding(pos, q, k, self.arch.head_dim, a.rotary_emb.cos_sin_cache, a.rotary_emb.is_neox)
        nh, nkv, d = a.attn.num_heads, a.attn.num_kv_heads, self.arch.head_dim
        q = q.view(-1, nh, d).transpose(0, 1)                                         # [Hq, N, D]
        k = k.view(-1, nkv, d).transpose(0, 1).repeat_interleave(nh // nkv, dim=0)
        v = v.view(-1, nkv, d).transpose(0, 1).repeat_interleave(nh // nkv, dim=0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(x.shape[0], nh * d)
        h = F.linear(o, a.o_proj.weight, getattr(a.o_proj, "bias", None)) + x
        w = self.post_attention_layernorm.weight
        n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.post_attention_layernorm.eps) * w
        g, u = F.linear(n, self.mlp.gate_up_proj.weight).chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, self.mlp.down_proj.weight) + h

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, t in weights:
            if name in _IGNORED or "rotary_emb" in name:
                continue
            target, shard = name, None
            if name.startswith("layers.0."):
                rest = name[len("layers.0."):]
                proj = rest.split(".")[-2] if rest.count(".") >= 2 else ""
                if proj in _STACKED:
                    target, shard = f"{_STACKED[proj][0]}.{rest.split('.')[-1]}", _STACKED[proj][1]
                else:
                    target = rest
            param = params.get(target)
            if param is None:
                raise UnknownWeightError(name)
            load_checkpoint_tensor(name, param, t, shard)
            loaded.add(target)
        return loaded

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The head's weights under the EAGLE checkpoint names (q/k/v and gate/up unstacked)."""
        a, H = self.self_attn, self.arch.hidden_size
        qkv = a.qkv_proj.weight.detach()
        I = self.arch.intermediate_size
        gu = self.mlp.gate_up_proj.weight.detach()
        out = {"fc.weight": self.fc.weight.detach(),
               "layers.0.self_attn.q_proj.weight": qkv[:a.q_size],
               "layers.0.self_attn.k_proj.weight": qkv[a.q_size:a.q_size + a.kv_size],
               "layers.0.self_attn.v_proj.weight": qkv[a.q_size + a.kv_size:],
               "layers.0.self_attn.o_proj.weight": a.o_proj.weight.detach(),
               "layers.0.mlp.gate_proj.weight": gu[:I], "layers.0.mlp.up_proj.weight": gu[I:],
               "layers.0.mlp.down_proj.weight": self.mlp.down_proj.weight.detach(),
               "layers.0.post_attention_layernorm.weight": self.post_attention_layernorm.weight.detach()}
        if self.fc.bias is not None:
            out["fc.bias"] = self.fc.bias.detach()
        del H
        return {k: v.contiguous().cpu() for k, v in out.items()}


def save_eagle_head(head: EagleHead, path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file(head.checkpoint_tensors(), os.path.join(path, "model.safetensors"))
    a = head.arch
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.hidden_size,
                   "intermediate_size": a.intermediate_size, "num_hidden_layers": 1,
                   "num_attention_heads": a.num_attention_heads, "num_key_value_heads": a.num_key_value_heads,
                   "vocab_size": a.vocab_size, "rms_norm_eps": a.rms_norm_eps, "rope_theta": a.rope_theta,
                   "max_position_embeddings": a.max_position_embeddings, "bias": head.fc.bias is not None}, f, indent=1)


def load_eagle_head(path: str, target: Any, device: torch.device | str) -> EagleHead:
    """The head in directory ``path`` for ``target`` (a LlamaForCausalLM); errors name the key."""
    from safetensors.torch import load_file

    if not os.path.isdir(path):
        raise ValueError(f"speculative.draft_model: {path!r} is not a directory with an EAGLE head")
    cfg: dict[str, Any] = {}
    cfg_path = os.path.join(path, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    arch = target.arch
    for key, want in (("hidden_size", arch.hidden_size), ("vocab_size", arch.vocab_size)):
        if key in cfg and cfg[key] != want:
            raise ValueError(f"speculative.draft_model: the head's {key} {cfg[key]} differs from the target's {want}")
    if "intermediate_size" in cfg:
        arch = dataclasses.replace(arch, intermediate_size=int(cfg["intermediate_size"]))
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        why = f" (found pickle files {bins}: convert them to safetensors)" if bins else ""
        raise ValueError(f"speculative.draft_model: no .safetensors file in {path!r}{why}")
    dtype = next(target.parameters()).dtype
    head = EagleHead(arch, fc_bias=bool(cfg.get("bias", True))).to(dtype)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(os.path.join(path, f)))
    if "fc.bias" not in tensors and head.fc.bias is not None:
        head.fc.bias = None
    loaded = head.load_weights(tensors.items())
    missing = [n for n, _ in head.named_parameters() if n not in loaded]
    if missing:
        raise ValueError(f"speculative.draft_model: the head in {path!r} lacks {missing}")
    return head.to(device).train(False)


class EagleProposer(Proposer):
    uses_hidden_states = True

    def __init__(self, head: EagleHead, target: Any, *, block_size: int, max_model_len: int,
                 device: torch.device | str) -> None:
        self.head, self.target = head, target
        a = head.arch
        self.hidden_size = a.hidden_size
        self.dtype = next(head.parameters()).dtype
        self.device = torch.device(device)
        self.cache = DraftKVCache(1, a.num_key_value_heads, a.head_dim, block_size, self.dtype, device)
        self.pending: dict[int, list[tuple[int, torch.Tensor]]] = {}   # (first position, features [n, H])

    def drop(self, req_ids: Sequence[int]) -> None:
        for rid in req_ids:
            self.cache.drop(rid)
            self.pending.pop(rid, None)

    def observe_hidden(self, req_ids: np.ndarray, step: Any, hidden: torch.Tensor | None,
                       valid: np.ndarray) -> None:
        if step is None or hidden is None:
            return
        qsl = step.query_start_loc
        for b, rid in enumerate(np.asarray(req_ids).tolist()):
            qs, n = int(qsl[b]), int(valid[b])
            if n > 0:
                self.pending.setdefault(rid, []).append((int(step.positions[qs]), hidden[qs:qs + n].detach().clone()))

    def _features(self, rid: int, lo: int, hi: int) -> torch.Tensor:
        """Target features of positions [lo, hi) (zeros where none was seen: prefix-cache hits)."""
        out = torch.zeros(hi - lo, self.hidden_size, dtype=self.dtype, device=self.device)
        for start, f in self.pending.get(rid, ()):
            a, b = max(lo, start), min(hi, start + f.shape[0])
            if a < b:
                out[a - lo:b - lo] = f[a - start:b - start].to(self.dtype)
        return out

    def _forward(self, rows: list[DraftRow], feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.cache.build(rows)
        f = torch.empty(b.input_ids.shape[0], self.hidden_size, dtype=self.dtype, device=self.device)
        for i, tr in enumerate(b.token_rows):
            f[torch.from_numpy(tr).to(self.device)] = feats[i]
        emb = self.target.model.embed_tokens(b.input_ids)                             # [T, H]
        out = self.head(emb, f, b.positions, self.cache.caches, b.md)[b.last]        # [R, H]
        return self.target.compute_logits(out), out

    @torch.inference_mode()
    def propose(self, reqs: Sequence[ProposalRequest]) -> list[np.ndarray]:
        reqs = list(reqs)
        k_max = max(r.k for r in reqs)
        props = np.zeros((len(reqs), k_max), np.int32)
        rows, feats = [], []
        for r in reqs:
            toks = np.asarray(r.token_ids, np.int64)
            L = toks.shape[0]
            start = max(min(self.cache.num_valid.get(r.req_id, 0), L - 2), 0)
            self.cache.ensure(r.req_id, L + r.k - 2)
            rows.append(DraftRow(r.req_id, start, toks[start + 1:L]))                 # x[t+1] at position t
            feats.append(self._features(r.req_id, start, L - 1))
        logits, f = self._forward(rows, feats)
        props[:, 0] = draw_coupled(logits, reqs, [0] * len(reqs))
        for j in range(1, k_max):
            live = [i for i, r in enumerate(reqs) if r.k > j]
            if not live:
                break
            drows = [DraftRow(reqs[i].req_id, int(reqs[i].token_ids.shape[0]) - 2 + j,
                              props[i, j - 1:j].astype(np.int64)) for i in live]
            sel = torch.tensor(live, dtype=torch.int64, device=self.device)
            logits, f_live = self._forward(drows, [f[i:i + 1] for i in live])
            f = f.index_copy(0, sel, f_live)
            props[live, j] = draw_coupled(logits, [reqs[i] for i in live], [j] * len(live))
        out = []
        for i, r in enumerate(reqs):
            # Positions computed from real features and verified tokens: [0, L - 1).
            self.cache.num_valid[r.req_id] = int(r.token_ids.shape[0]) - 1
            self.pending.pop(r.req_id, None)
            out.append(props[i, :r.k])
        return out
