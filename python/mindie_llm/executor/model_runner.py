# SPDX-License-Identifier: Apache-2.0
"""ModelRunner: SchedulerOutput (contract 2) -> flat batch tensors -> forward -> logits of the
sampling positions (plus prompt rows for prompt_logprobs) -> Sampler -> ModelRunnerOutput
(contract 3): a variable number of tokens per sampling row.

Everything the runner knows about a request comes from the step message (``new_requests`` adds
it, ``finished_ids`` drops it). Batch building happens in one place (``_prepare``): the numpy
arrays of ``InputBatch.build`` are copied into persistent device buffers sized
``max_num_batched_tokens`` / ``max_num_seqs`` and the model sees slices of them, so that a
graph-capturing runner can replay a captured graph on the same storage.

Verification of proposed tokens: a row with k proposals gets k + 1 logits rows; every position is
sampled with the seed of its output position (greedy or seeded draws alike), and the proposals are
accepted up to the first that differs from the sampled token, which is kept as the correction.
Because each draw depends only on (seed, position) and the logits, this yields exactly the tokens
decoding without proposals would produce; for a proposer that puts all its mass on one token it is
the standard accept/resample rule (accept with p(draft), else draw from p without the draft).

Must not import the engine, the scheduler extension or the server.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mindie_llm.contract import ModelRunnerOutput, PromptLogprobs, SchedulerOutput
from mindie_llm.executor.input_batch import FlatBatch, InputBatch, RequestState
from mindie_llm.layers.sampler import Sampler, SamplerOutput, SamplingMetadata
from mindie_llm.ops.attention_metadata import AttentionMetadata

__all__ = ["ModelRunner", "SamplingPositions"]


class SamplingPositions:
    """The logits rows of one step, each tied to a request state and to the proposals before it.

    Row r belongs to sampling row ``owner[r]`` and samples output position
    ``len(outputs) + within[r]``, after the first ``within[r]`` proposals of its row."""

    def __init__(self, fb: FlatBatch) -> None:
        offs = fb.logits_offsets
        self.num_rows = int(offs[-1])                                   # L
        counts = np.diff(offs)                                          # [S]
        self.owner = np.repeat(np.arange(counts.shape[0]), counts)      # [L]
        self.within = np.arange(self.num_rows) - offs[self.owner]       # [L]
        self.states = [fb.sample_states[i] for i in self.owner.tolist()]
        self.spec_offsets = offs - np.arange(offs.shape[0])             # [S+1] proposals per row (CSR)
        self.spec = fb.spec_token_ids                                   # [L - S]
        self.has_spec = bool(self.spec.shape[0])
        self.grammar_req_ids = fb.grammar_req_ids                       # [G] int64
        self.grammar_bitmask = fb.grammar_bitmask                       # [G*W] int32

    def preceding(self, r: int) -> np.ndarray:
        """Proposals that come before logits row r in its request (int32)."""
        i = int(self.owner[r])
        lo = int(self.spec_offsets[i])
        return self.spec[lo:lo + int(self.within[r])]


class ModelRunner:
    def __init__(self, model: nn.Module, vocab_size: int, kv_caches: list[torch.Tensor], *, block_size: int,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 device: torch.device) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.max_model_len = max_model_len
        self.batch = InputBatch(max_num_seqs, max_model_len, block_size)
        self.sampler = Sampler()
        # Persistent device buffers (a graph runner replays on their storage).
        T, B = max_num_batched_tokens, max_num_seqs
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids_buf = torch.zeros(T, **i64)
        self.positions_buf = torch.zeros(T, **i64)
        self.slot_mapping_buf = torch.zeros(T, **i64)
        self.query_start_loc_buf = torch.zeros(B + 1, **i32)
        self.seq_lens_buf = torch.zeros(B, **i32)
        self.block_tables_buf = torch.zeros(B, self.batch.max_blocks_per_seq, **i32)
        self.last_step: tuple[FlatBatch, torch.Tensor | None] | None = None  # for a proposer's hook

    def has_request(self, req_id: int) -> bool:
        return req_id in self.batch.requests

    # ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self.batch.apply(out)
        if out.num_reqs == 0:
            return ModelRunnerOutput.empty()
        fb = self.batch.build(out)
        input_ids, positions, md = self._prepare(fb)
        hidden = self.model(input_ids, positions, self.kv_caches, md)        # [T, H]
        return self.sample_and_verify(fb, hidden)

    def sample_and_verify(self, fb: FlatBatch, hidden: torch.Tensor, logits: torch.Tensor | None = None
                          ) -> ModelRunnerOutput:
        """Logits of the sampling positions (unless given) -> tokens per row, verified against the
        proposals -> the runner's output; appends the accepted tokens to each request's state."""
        self.last_step = (fb, hidden)         # the worker's speculator reads the hidden states
        L = fb.logits_indices.shape[0]
        if logits is None:
            rows = np.concatenate([fb.logits_indices, fb.prompt_rows]) if fb.prompt_rows.size else fb.logits_indices
            if rows.size == 0:
                return ModelRunnerOutput.empty()
            logits = self.model.compute_logits(hidden[torch.from_numpy(rows).to(self.device)])  # [L+P', V]
        result = ModelRunnerOutput(fb.sample_req_ids, np.zeros(fb.sample_req_ids.shape[0] + 1, np.int32),
                                   np.zeros(0, np.int32))
        if L:
            pos = SamplingPositions(fb)
            so = self.sampler(logits[:L], self._sampling_metadata(pos))
            sampled = so.sampled.to("cpu", torch.int32).numpy()               # [L] the host sync
            keep = self._accept(pos, sampled, result)
            self._collect_logprobs(pos, so, keep, result)
            for st, lo, hi in zip(fb.sample_states, result.token_offsets[:-1].tolist(),
                                  result.token_offsets[1:].tolist()):
                st.output_token_ids.extend(result.token_ids[lo:hi].tolist())
        if fb.prompt_rows.size:
            self._prompt_logprobs(fb, logits[L:], result)
        return result

    @staticmethod
    def _accept(pos: SamplingPositions, sampled: np.ndarray, result: ModelRunnerOutput) -> np.ndarray:
        """Fills the token CSR of ``result``: per row, the sampled tokens up to and including the
        first that differs from its proposal. Returns the logits rows kept ([*] int64)."""
        if not pos.has_spec:
            result.token_offsets = np.arange(sampled.shape[0] + 1, dtype=np.int32)
            result.token_ids = sampled.astype(np.int32)
            return np.arange(sampled.shape[0])
        keep: list[int] = []
        offs = [0]
        so = pos.spec_offsets
        for i in range(so.shape[0] - 1):
            first = int(so[i]) + i                                      # row i's first logits row
            spec = pos.spec[so[i]:so[i + 1]]
            n = 0
            while n < spec.shape[0] and sampled[first + n] == spec[n]:
                n += 1
            keep.extend(range(first, first + n + 1))
            offs.append(offs[-1] + n + 1)
        kept = np.asarray(keep, np.int64)
        result.token_offsets = np.asarray(offs, np.int32)
        result.token_ids = sampled[kept].astype(np.int32)
        return kept

    def _prepare(self, fb: FlatBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        T, B = fb.input_ids.shape[0], fb.seq_lens.shape[0]
        width = max(-(-fb.max_seq_len // self.block_size), 1)
        self.input_ids_buf[:T].copy_(torch.from_numpy(fb.input_ids))
        self.positions_buf[:T].copy_(torch.from_numpy(fb.positions))
        self.slot_mapping_buf[:T].copy_(torch.from_numpy(fb.slot_mapping))
        self.query_start_loc_buf[:B + 1].copy_(torch.from_numpy(fb.query_start_loc))
        self.seq_lens_buf[:B].copy_(torch.from_numpy(fb.seq_lens))
        self.block_tables_buf[:B, :width].copy_(torch.from_numpy(np.ascontiguousarray(fb.block_tables[:, :width])))
        md = AttentionMetadata(
            slot_mapping=self.slot_mapping_buf[:T], query_start_loc=self.query_start_loc_buf[:B + 1],
            seq_lens=self.seq_lens_buf[:B], block_tables=self.block_tables_buf[:B, :width],
            num_decodes=fb.num_decodes, max_query_len=fb.max_query_len, max_seq_len=fb.max_seq_len)
        return self.input_ids_buf[:T], self.positions_buf[:T], md

    # ------------------------------------------------------------------------------------ sampling
    def _sampling_metadata(self, pos: SamplingPositions) -> SamplingMetadata:
        states = pos.states
        L, dev = len(states), self.device
        sp = [s.sampling for s in states]
        temp = np.fromiter((p.temperature for p in sp), np.float32, L)
        top_k = np.fromiter((p.top_k for p in sp), np.int64, L)
        top_p = np.fromiter((p.top_p for p in sp), np.float32, L)
        min_p = np.fromiter((p.min_p for p in sp), np.float32, L)
        out_pos = [len(s.output_token_ids) + int(w) for s, w in zip(states, pos.within.tolist())]
        t = (lambda a: torch.from_numpy(a).to(dev))
        md = SamplingMetadata(
            temperature=t(temp), top_k=t(top_k), top_p=t(top_p), min_p=t(min_p),
            seeds=[s.seed for s in states], output_positions=out_pos,
            all_greedy=bool((temp == 0).all()), random_rows=np.flatnonzero(temp > 0).tolist(),
            need_top_k_top_p=bool(((top_k > 0) & (temp > 0)).any() or ((top_p < 1) & (temp > 0)).any()),
            need_min_p=bool(((min_p > 0) & (temp > 0)).any()),
        )
        lp = [p.logprobs for p in sp if p.logprobs >= 0]
        md.max_num_logprobs = max(lp) if lp else -1
        if any(p.has_penalties for p in sp):
            md.presence = t(np.fromiter((p.presence_penalty for p in sp), np.float32, L))
            md.frequency = t(np.fromiter((p.frequency_penalty for p in sp), np.float32, L))
            md.repetition = t(np.fromiter((p.repetition_penalty for p in sp), np.float32, L))
            md.prompt_mask, md.output_counts = self._token_stats(pos)
        banned_r, banned_t = [], []
        for r, (s, p, n) in enumerate(zip(states, sp, out_pos)):
            if n < p.min_tokens and p.banned.size:
                ids = p.banned[(p.banned >= 0) & (p.banned < self.vocab_size)]
                banned_r += [r] * int(ids.size)
                banned_t += ids.tolist()
        if banned_r:
            md.banned_rows = torch.tensor(banned_r, dtype=torch.int64, device=dev)
            md.banned_tokens = torch.tensor(banned_t, dtype=torch.int64, device=dev)
        self._logit_bias(md, sp)
        G = int(pos.grammar_req_ids.shape[0])
        if G:   # structured output: each constrained request's mask on its logits rows, the rest all-allowed
            words = -(-self.vocab_size // 32)
            masks = pos.grammar_bitmask.reshape(G, -1)
            if masks.shape[1] != words:
                raise ValueError(f"grammar_bitmask: {masks.shape[1]} words per row, the vocabulary needs {words}")
            row_of = {int(r): i for i, r in enumerate(pos.grammar_req_ids.tolist())}
            full = np.full((L, words), -1, np.int32)                                 # [L, W]
            for r, st in enumerate(states):
                g = row_of.get(st.req_id)
                if g is not None:
                    full[r] = masks[g]
            md.token_bitmask = t(full)
        return md

    def _logit_bias(self, md: SamplingMetadata, rows: list) -> None:
        """``md.bias_*``: the (row, token, bias) triples of the rows' logit_bias maps (ids outside
        the vocabulary, which the engine refuses at admission, are dropped)."""
        if not any(p.bias_ids.size for p in rows):
            return
        r = np.concatenate([np.full(p.bias_ids.size, i, np.int64) for i, p in enumerate(rows)])     # [K]
        ids = np.concatenate([p.bias_ids for p in rows]).astype(np.int64)                           # [K]
        vals = np.concatenate([p.bias_values for p in rows]).astype(np.float32)                     # [K]
        ok = (ids >= 0) & (ids < self.vocab_size)
        md.bias_rows, md.bias_tokens, md.bias_values = (torch.from_numpy(a[ok]).to(self.device)
                                                        for a in (r, ids, vals))

    def _token_stats(self, pos: SamplingPositions) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt-token mask and output-token counts [L, V] of each logits row (its request's
        outputs so far plus the proposals before that row)."""
        L, V, dev = len(pos.states), self.vocab_size, self.device
        prompt_mask = torch.zeros(L, V, dtype=torch.bool, device=dev)
        counts = torch.zeros(L, V, dtype=torch.int32, device=dev)
        for r, s in enumerate(pos.states):  # one vectorized scatter per row
            prompt_mask[r, torch.from_numpy(s.prompt_token_ids.astype(np.int64)).to(dev)] = True
            seen = s.output_token_ids + (pos.preceding(r).tolist() if pos.has_spec else [])
            if seen:
                out = torch.tensor(seen, dtype=torch.int64, device=dev)
                counts[r].index_add_(0, out, torch.ones_like(out, dtype=torch.int32))
        return prompt_mask, counts

    def _collect_logprobs(self, pos: SamplingPositions, so: SamplerOutput, keep: np.ndarray,
                          result: ModelRunnerOutput) -> None:
        """Logprob arrays aligned with ``result.token_ids`` (rows that did not ask hold zeros)."""
        if so.token_logprob is None:
            return
        idx = torch.from_numpy(keep).to(so.token_logprob.device)
        result.token_logprobs = so.token_logprob[idx].cpu().numpy()
        result.token_ranks = so.token_rank[idx].cpu().numpy()
        result.top_ids = so.top_ids[idx].cpu().numpy()
        result.top_logprobs = so.top_logprobs[idx].cpu().numpy()
        first_rows = (pos.spec_offsets[:-1] + np.arange(pos.spec_offsets.shape[0] - 1)).tolist()
        result.logprob_rows = np.array([pos.states[r].sampling.logprobs >= 0 for r in first_rows], bool)

    def _prompt_logprobs(self, fb: FlatBatch, logits: torch.Tensor, result: ModelRunnerOutput) -> None:
        lp = torch.log_softmax(logits.to(torch.float32), dim=-1)            # [P', V]
        tgt = torch.from_numpy(fb.prompt_targets).to(lp.device)
        tok_lp = lp.gather(-1, tgt[:, None]).squeeze(-1)                    # [P']
        rank = (lp > tok_lp[:, None]).sum(-1) + 1                           # [P']
        owners = fb.prompt_owner
        n_max = max(self.batch.requests[int(r)].sampling.prompt_logprobs for r in set(owners.tolist()))
        top_lp, top_ids = torch.topk(lp, n_max, dim=-1) if n_max > 0 else (lp[:, :0], lp[:, :0].long())
        tok_lp, rank = tok_lp.cpu().numpy(), rank.cpu().numpy()
        top_lp, top_ids = top_lp.cpu().numpy(), top_ids.cpu().numpy()
        for owner in dict.fromkeys(owners.tolist()):
            sel = owners == owner
            n = self.batch.requests[owner].sampling.prompt_logprobs
            result.prompt_logprobs[owner] = PromptLogprobs(
                positions=fb.prompt_pos[sel], token_ids=fb.prompt_targets[sel], logprobs=tok_lp[sel],
                ranks=rank[sel], top_ids=top_ids[sel, :n], top_logprobs=top_lp[sel, :n])
