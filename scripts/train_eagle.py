#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Trains an EAGLE-style head for the embedded SmolLM2-135M briefly on the CPU, saves it with the
published EAGLE tensor names, and measures its acceptance rate through the engine.

Text: the docstrings of the installed ``torch`` package (``inspect.getdoc`` of the public members
of torch, torch.nn, torch.nn.functional, torch.optim and torch.Tensor), English prose plus code
snippets. The target runs over it once (teacher forcing) to give its final hidden states f[t] and
next-token distributions; the head learns f'[t+1] from (embed(x[t+1]), f[t]) with EAGLE's loss:
smooth-L1 to f[t+1] plus 0.1 x cross-entropy of the LM head's logits against the target's
distribution (on a sample of positions, the LM head being the expensive part). The decoder layer
starts from a copy of the target's last layer with its output projections zeroed (an identity
residual), fc from "keep the feature", so training starts from f'[t+1] = f[t].

    python scripts/train_eagle.py --out /tmp/eagle-smollm2 --minutes 3
    then: LLM(speculative_config={"method": "eagle", "draft_model": "/tmp/eagle-smollm2"})
"""
from __future__ import annotations

import argparse
import inspect
import time

import numpy as np
import torch
import torch.nn.functional as F


def corpus_text(max_chars: int) -> str:
    import torch.nn
    import torch.nn.functional
    import torch.optim

    parts, seen = [], set()
    for mod in (torch, torch.nn, torch.nn.functional, torch.optim, torch.Tensor):
        for name in sorted(dir(mod)):
            if name.startswith("_"):
                continue
            try:
                doc = inspect.getdoc(getattr(mod, name))
            except Exception:  # noqa: BLE001 - some attributes raise on access
                continue
            if doc and len(doc) > 200 and doc not in seen:
                seen.add(doc)
                parts.append(doc)
            if sum(map(len, parts)) > max_chars:
                return "\n\n".join(parts)
    return "\n\n".join(parts)


@torch.inference_mode()
def target_features(model, seqs: torch.Tensor, block_size: int = 16):
    """Final hidden states [B, N, H] of the target over token sequences [B, N] (one forward)."""
    from mindie_llm.executor.kv_cache import KVCacheSpec, allocate_kv_caches
    from mindie_llm.ops.attention_metadata import AttentionMetadata

    arch = model.arch
    B, N = seqs.shape
    per = -(-N // block_size)
    spec = KVCacheSpec(arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim, block_size, torch.float32)
    kv = allocate_kv_caches(spec, B * per + 1, "cpu")
    tables = [list(range(1 + b * per, 1 + (b + 1) * per)) for b in range(B)]
    md = AttentionMetadata.build([0] * B, [N] * B, tables, block_size)
    pos = torch.arange(N).repeat(B)
    return model(seqs.reshape(-1), pos, kv, md).reshape(B, N, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory to write the head to")
    ap.add_argument("--minutes", type=float, default=3.0, help="training time budget (feature pass excluded)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--num-seqs", type=int, default=48)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=48, help="max_tokens of the acceptance run (0: skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from mindie_llm.config import ModelConfig
    from mindie_llm.loader import load_model
    from mindie_llm.spec_decode.eagle import EagleHead, save_eagle_head

    loaded = load_model(ModelConfig(dtype="float32"), "cpu", "float32", progress=False)
    target, tok = loaded.model, loaded.tokenizer
    ids = tok.encode(corpus_text(args.seq_len * args.num_seqs * 6), add_special_tokens=False)
    n = min(len(ids) // args.seq_len, args.num_seqs)
    seqs = torch.tensor(ids[:n * args.seq_len], dtype=torch.int64).reshape(n, args.seq_len)
    t0 = time.time()
    feats = torch.cat([target_features(target, seqs[i:i + 8]) for i in range(0, n, 8)])   # [n, N, H]
    print(f"features: {n} sequences x {args.seq_len} tokens of torch docstrings in {time.time() - t0:.0f}s", flush=True)

    head = EagleHead(target.arch)
    last = target.model.layers[-1]
    with torch.no_grad():
        head.self_attn.load_state_dict(last.self_attn.state_dict())
        head.mlp.load_state_dict(last.mlp.state_dict())
        head.post_attention_layernorm.weight.copy_(last.post_attention_layernorm.weight)
        head.self_attn.o_proj.weight.zero_()
        head.mlp.down_proj.weight.zero_()
        H = target.arch.hidden_size
        head.fc.weight.zero_()
        head.fc.weight[:, H:].copy_(torch.eye(H))
        head.fc.bias.zero_()
    params = list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    emb_w, head_w = target.model.embed_tokens.weight.detach(), target.lm_head.weight.detach()
    scale = float(feats.std())                                         # feature loss in units of f's spread
    budget, step, t0 = args.minutes * 60, 0, time.time()
    order = np.random.default_rng(0).permutation(n)
    while time.time() - t0 < budget:
        i = int(order[step % n])
        x, f = seqs[i], feats[i]                                       # [N], [N, H]
        inp_f = f[:-1] + (torch.rand_like(f[:-1]) - 0.5) * 0.2         # EAGLE's feature noise
        pred = head.forward_dense(F.embedding(x[1:], emb_w), inp_f)    # [N-1, H] ~ f[1:]
        loss_f = F.smooth_l1_loss(pred / scale, f[1:] / scale)
        sel = torch.randint(0, pred.shape[0], (16,))
        with torch.no_grad():
            p_t = torch.softmax(F.linear(f[1:][sel], head_w), -1)
        loss_p = -(p_t * torch.log_softmax(F.linear(pred[sel], head_w), -1)).sum(-1).mean()
        loss = loss_f + 0.1 * loss_p
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 10 == 0:
            with torch.no_grad():
                top1 = (F.linear(pred[sel], head_w).argmax(-1) == p_t.argmax(-1)).float().mean()
            print(f"step {step:4d}  {time.time() - t0:5.0f}s  loss {loss.item():.4f}  "
                  f"(feature {loss_f.item():.4f}, token {loss_p.item():.3f})  top-1 vs target {top1:.2f}", flush=True)
    head.train(False)
    for p in params:
        p.requires_grad_(False)
    save_eagle_head(head, args.out)
    print(f"saved {args.out} after {step} steps ({time.time() - t0:.0f}s)")
    if args.eval_tokens:
        evaluate(loaded, args.out, args.eval_tokens)


def evaluate(loaded, head_dir: str, max_tokens: int) -> None:
    """Acceptance of the head through the engine on a few chat prompts (greedy, output checked
    against no speculation)."""
    from mindie_llm import LLM, SamplingParams

    prompts = ["Explain what a tensor is in PyTorch.", "Write a Python function that reverses a list.",
               "What does torch.nn.Linear do?", "Give three tips for writing clear documentation."]
    sp = SamplingParams(temperature=0, max_tokens=max_tokens)
    res = {}
    for name, spec in (("none", None), ("eagle", {"method": "eagle", "draft_model": head_dir,
                                                  "num_speculative_tokens": 3, "auto_off_min_acceptance": 0})):
        llm = LLM(loaded_model=loaded, dtype="float32", max_model_len=1024, speculative_config=spec)
        msgs = [[{"role": "user", "content": p}] for p in prompts]
        t0 = time.time()
        outs = llm.chat(msgs, sp, use_tqdm=False)
        res[name] = ([o.outputs[0].token_ids for o in outs], time.time() - t0, llm.engine.get_stats())
    same = res["none"][0] == res["eagle"][0]
    st = res["eagle"][2]
    print(f"eagle head: acceptance {st.spec_acceptance_rate:.2f} ({st.spec_num_accepted_tokens}/"
          f"{st.spec_num_draft_tokens}), mean accepted length {st.spec_mean_accepted_length:.2f}, "
          f"output identical to no speculation: {same}; wall {res['none'][1]:.1f}s -> {res['eagle'][1]:.1f}s")


if __name__ == "__main__":
    main()
