# SPDX-License-Identifier: Apache-2.0
"""Speculator: drives one proposer once per step, inside the worker, after the target sampled.

``after_step(out, res, runner)``: forgets the requests of ``out.finished_ids``, records how many
of each row's scheduled proposals were accepted (the auto-off switch), hands the target's hidden
states to proposers that read them, asks the proposer for the next step's tokens of every
sampling row and writes them to ``res.draft_offsets`` / ``res.draft_token_ids`` (the scheduler
caps them by budget, max_tokens, max_model_len and free blocks). Everything it uses is the step
message and the runner's per-request state, so every rank computes the same proposals.

``make_speculator(config, ...)`` builds the proposer ``config.speculative`` names. Must not import
the engine or the server.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from mindie_llm.contract import ModelRunnerOutput, SchedulerOutput
from mindie_llm.spec_decode.acceptance import AcceptanceTracker
from mindie_llm.spec_decode.proposer import ProposalRequest, Proposer

__all__ = ["Speculator", "make_speculator", "TARGET_LAYERS_PREFIX"]

TARGET_LAYERS_PREFIX = "target-layers:"     # draft_model "target-layers:N": the target's first N layers


class Speculator:
    def __init__(self, proposer: Proposer, num_speculative_tokens: int, max_model_len: int,
                 tracker: AcceptanceTracker | None = None, disable_by_batch_size: int = 0) -> None:
        self.proposer = proposer
        self.disable_by_batch_size = disable_by_batch_size
        self.k = num_speculative_tokens
        self.max_model_len = max_model_len
        self.tracker = tracker or AcceptanceTracker(0.0)

    def after_step(self, out: SchedulerOutput, res: ModelRunnerOutput, runner: Any) -> None:
        finished = np.asarray(out.finished_ids).tolist()
        if finished:
            self.proposer.drop(finished)
            for rid in finished:
                self.tracker.drop(rid)
        self.tracker.tick()
        if out.num_reqs == 0 or res.num_rows == 0:
            return
        smask = np.asarray(out.sample_mask, bool)                                  # [B]
        nspec = np.diff(np.asarray(out.spec_offsets, np.int64))                    # [B]
        ntok = np.diff(np.asarray(res.token_offsets, np.int64))                    # [S]
        accepted = np.maximum(ntok - 1, 0)                                         # [S]
        for rid, p, a in zip(res.req_ids.tolist(), nspec[smask].tolist(), accepted.tolist()):
            self.tracker.record(rid, p, a)
        if self.proposer.uses_hidden_states:
            step = getattr(runner, "last_step", None)
            valid = np.asarray(out.num_scheduled_tokens, np.int64) - nspec          # [B] real tokens ...
            valid[smask] += accepted                                               # ... plus accepted ones
            fb, hidden = step if step is not None else (None, None)
            self.proposer.observe_hidden(np.asarray(out.req_ids), fb, hidden, valid)
        reqs, rows = [], []
        crowded = 0 < self.disable_by_batch_size < res.num_rows   # a big batch is compute-bound: no gain
        # Structured output: the step's grammar mask holds for a row's first token only, so
        # constrained requests get no proposals.
        constrained = set(np.asarray(getattr(out, "grammar_req_ids", ())).tolist())
        for i, rid in enumerate([] if crowded else res.req_ids.tolist()):
            st = runner.batch.requests.get(rid)
            if st is None or rid in constrained or not self.tracker.enabled(rid):
                continue
            toks = np.concatenate([st.prompt_token_ids, np.asarray(st.output_token_ids, np.int32)])
            k = min(self.k, self.max_model_len - int(toks.shape[0]))
            if k <= 0:
                continue
            sp = st.sampling
            reqs.append(ProposalRequest(rid, toks, len(st.output_token_ids), k, float(sp.temperature),
                                        int(sp.top_k), float(sp.top_p), int(st.seed)))
            rows.append(i)
        counts = np.zeros(res.num_rows, np.int64)
        ids: list[np.ndarray] = [np.zeros(0, np.int32)] * res.num_rows
        if reqs:
            for i, r, p in zip(rows, reqs, self.proposer.propose(reqs)):
                p = np.asarray(p, np.int32)[:r.k]
                counts[i], ids[i] = p.shape[0], p
        offs = np.zeros(res.num_rows + 1, np.int32)
        np.cumsum(counts, out=offs[1:])
        res.draft_offsets = offs
        res.draft_token_ids = np.concatenate(ids).astype(np.int32) if offs[-1] else np.zeros(0, np.int32)


def _truncated_target(target: Any, n: int) -> Any:
    """The target's first ``n`` layers, its final norm and LM head (weights shared, no copy)."""
    import dataclasses

    from torch import nn

    from mindie_llm.models.llama import LlamaForCausalLM, LlamaModel

    arch = target.arch
    if not 1 <= n <= arch.num_hidden_layers:
        raise ValueError(f"speculative.draft_model: {TARGET_LAYERS_PREFIX}{n} needs 1 <= N <= "
                         f"{arch.num_hidden_layers} (the target's layers)")
    draft = LlamaForCausalLM.__new__(LlamaForCausalLM)
    nn.Module.__init__(draft)
    draft.arch = dataclasses.replace(arch, num_hidden_layers=n)
    inner = LlamaModel.__new__(LlamaModel)
    nn.Module.__init__(inner)
    inner.embed_tokens, inner.norm = target.model.embed_tokens, target.model.norm
    inner.layers = nn.ModuleList(list(target.model.layers)[:n])
    draft.model, draft.lm_head = inner, target.lm_head
    return draft


def make_speculator(config: Any, *, target_model: Any, device: Any, block_size: int,
                    max_model_len: int) -> Speculator | None:
    """The speculator of ``config.speculative`` (None when method is none)."""
    sc = config.speculative
    if sc.method == "none":
        return None
    if sc.method == "ngram":
        from mindie_llm.spec_decode.ngram import NgramProposer

        proposer: Proposer = NgramProposer(sc.ngram_min, sc.ngram_max)
    elif sc.method == "draft":
        from mindie_llm.spec_decode.draft_model import DraftModelProposer

        path = sc.draft_model
        if path is None:
            raise ValueError("speculative.draft_model: method draft needs a draft model path "
                             f"(or {TARGET_LAYERS_PREFIX}N for the target's first N layers)")
        if path.startswith(TARGET_LAYERS_PREFIX):
            n = path[len(TARGET_LAYERS_PREFIX):]
            if not n.isdigit():
                raise ValueError(f"speculative.draft_model: {path!r}: N must be an integer")
            draft = _truncated_target(target_model, int(n))
        else:
            import dataclasses

            from mindie_llm.loader import load_model

            draft = load_model(dataclasses.replace(config.model, path=path, served_model_name=None,
                                                   tokenizer=None, quantization="none"), device,
                               progress=False).model
        proposer = DraftModelProposer(draft, target_vocab_size=target_model.arch.vocab_size,
                                      block_size=block_size, max_model_len=max_model_len, device=device)
    elif sc.method == "eagle":
        from mindie_llm.spec_decode.eagle import EagleProposer, load_eagle_head

        head = load_eagle_head(sc.draft_model, target_model, device)
        proposer = EagleProposer(head, target_model, block_size=block_size, max_model_len=max_model_len,
                                 device=device)
    else:  # config validation makes this unreachable
        raise ValueError(f"speculative.method: unknown {sc.method!r}")
    tracker = AcceptanceTracker(sc.auto_off_min_acceptance, sc.auto_off_window, sc.auto_off_cooldown_steps)
    return Speculator(proposer, sc.num_speculative_tokens, max_model_len, tracker, sc.disable_by_batch_size)
