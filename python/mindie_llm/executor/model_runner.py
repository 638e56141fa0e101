# SPDX-License-Identifier: Apache-2.0
"""ModelRunner: SchedulerOutput -> flat batch tensors -> forward -> logits of the sampling rows
(plus prompt rows for prompt_logprobs) -> Sampler -> one token per sampling request.

Batch building happens in one place (``_prepare``): the numpy arrays of ``InputBatch.build`` are
copied into persistent device buffers sized ``max_num_batched_tokens`` / ``max_num_seqs`` and the
model sees slices of them, so that a graph-capturing backend can replay a captured graph on the
same storage. The only host sync is the final copy of sampled tokens (and of logprobs when asked).

Must not import the engine, the scheduler extension or the server.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from mindie_llm.executor.input_batch import FlatBatch, InputBatch, RequestState
from mindie_llm.layers.attention import AttentionMetadata
from mindie_llm.layers.sampler import Sampler, SamplerOutput, SamplingMetadata
from mindie_llm.sampling_params import SamplingParams

__all__ = ["ModelRunner", "RunnerOutput", "TokenLogprobs"]


@dataclass
class TokenLogprobs:
    """Logprobs of one token: its own (and rank) and the top-N of the raw distribution."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class RunnerOutput:
    req_ids: np.ndarray                      # [S] int64, batch order
    sampled_token_ids: np.ndarray            # [S] int32
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)      # req id -> sampled token's
    prompt_logprobs: dict[int, list[tuple[int, TokenLogprobs]]] = field(default_factory=dict)  # (pos, lp)


class ModelRunner:
    def __init__(self, model: nn.Module, vocab_size: int, kv_caches: list[torch.Tensor], *, block_size: int,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 eos_token_ids: Sequence[int], device: torch.device) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = list(eos_token_ids)
        self.batch = InputBatch(max_num_seqs, max_model_len, block_size)
        self.sampler = Sampler()
        # Persistent device buffers (a graph backend replays on their storage).
        T, B = max_num_batched_tokens, max_num_seqs
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids_buf = torch.zeros(T, **i64)
        self.positions_buf = torch.zeros(T, **i64)
        self.slot_mapping_buf = torch.zeros(T, **i64)
        self.query_start_loc_buf = torch.zeros(B + 1, **i32)
        self.seq_lens_buf = torch.zeros(B, **i32)
        self.block_tables_buf = torch.zeros(B, self.batch.max_blocks_per_seq, **i32)

    # ------------------------------------------------------------------------------------
    def add_request(self, req_id: int, prompt_token_ids: Sequence[int], params: SamplingParams, seed: int,
                    want_prompt_logprobs: bool = False) -> None:
        self.batch.add(RequestState(req_id=req_id, prompt_token_ids=np.asarray(prompt_token_ids, dtype=np.int32),
                                    params=params, seed=seed, want_prompt_logprobs=want_prompt_logprobs))

    def remove_request(self, req_id: int) -> None:
        self.batch.remove(req_id)

    def has_request(self, req_id: int) -> bool:
        return req_id in self.batch.requests

    # ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: Any) -> RunnerOutput:
        self.batch.apply_diffs(out)
        if len(out.req_ids) == 0:
            return RunnerOutput(np.zeros(0, np.int64), np.zeros(0, np.int32))
        fb = self.batch.build(out)
        input_ids, positions, md = self._prepare(fb)
        hidden = self.model(input_ids, positions, self.kv_caches, md)        # [T, H]
        S = fb.logits_indices.shape[0]
        rows = np.concatenate([fb.logits_indices, fb.prompt_rows]) if fb.prompt_rows.size else fb.logits_indices
        if rows.size == 0:
            return RunnerOutput(np.zeros(0, np.int64), np.zeros(0, np.int32))
        logits = self.model.compute_logits(hidden[torch.from_numpy(rows).to(self.device)])  # [S+P', V]
        result = RunnerOutput(fb.sample_req_ids, np.zeros(0, np.int32))
        if S:
            smd = self._sampling_metadata(fb.sample_states)
            so = self.sampler(logits[:S], smd)
            sampled = so.sampled.to("cpu", torch.int32).numpy()               # the host sync
            result.sampled_token_ids = sampled
            self._collect_logprobs(fb.sample_states, so, sampled, result)
            for st, t in zip(fb.sample_states, sampled.tolist()):
                st.output_token_ids.append(t)
        if fb.prompt_rows.size:
            self._prompt_logprobs(fb, logits[S:], result)
        return result

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

    def _sampling_metadata(self, states: list[RequestState]) -> SamplingMetadata:
        S, V, dev = len(states), self.vocab_size, self.device
        ps = [s.params for s in states]
        temp = np.fromiter((p.temperature for p in ps), np.float32, S)
        top_k = np.fromiter((p.top_k for p in ps), np.int64, S)
        top_p = np.fromiter((p.top_p for p in ps), np.float32, S)
        min_p = np.fromiter((p.min_p for p in ps), np.float32, S)
        t = (lambda a: torch.from_numpy(a).to(dev))
        md = SamplingMetadata(
            temperature=t(temp), top_k=t(top_k), top_p=t(top_p), min_p=t(min_p),
            seeds=[s.seed for s in states], output_positions=[len(s.output_token_ids) for s in states],
            all_greedy=bool((temp == 0).all()), random_rows=np.flatnonzero(temp > 0).tolist(),
            need_top_k_top_p=bool(((top_k > 0) & (temp > 0)).any() or ((top_p < 1) & (temp > 0)).any()),
            need_min_p=bool(((min_p > 0) & (temp > 0)).any()),
        )
        lp = [p.logprobs for p in ps if p.logprobs is not None]
        md.max_num_logprobs = max(lp) if lp else -1
        if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in ps):
            md.presence = t(np.fromiter((p.presence_penalty for p in ps), np.float32, S))
            md.frequency = t(np.fromiter((p.frequency_penalty for p in ps), np.float32, S))
            md.repetition = t(np.fromiter((p.repetition_penalty for p in ps), np.float32, S))
            md.prompt_mask, md.output_counts = self._token_stats(states)
        banned_r, banned_t = [], []
        for i, s in enumerate(states):
            if len(s.output_token_ids) < s.params.min_tokens:
                ids = list(s.params.stop_token_ids or ())
                if not s.params.ignore_eos:
                    ids += self.eos_token_ids
                ids = [x for x in ids if 0 <= x < V]
                banned_r += [i] * len(ids)
                banned_t += ids
        if banned_r:
            md.banned_rows = torch.tensor(banned_r, dtype=torch.int64, device=dev)
            md.banned_tokens = torch.tensor(banned_t, dtype=torch.int64, device=dev)
        return md

    def _token_stats(self, states: list[RequestState]) -> tuple[torch.Tensor, torch.Tensor]:
        S, V, dev = len(states), self.vocab_size, self.device
        prompt_mask = torch.zeros(S, V, dtype=torch.bool, device=dev)
        counts = torch.zeros(S, V, dtype=torch.int32, device=dev)
        for i, s in enumerate(states):  # one vectorized scatter per request
            prompt_mask[i, torch.from_numpy(s.prompt_token_ids.astype(np.int64)).to(dev)] = True
            if s.output_token_ids:
                out = torch.tensor(s.output_token_ids, dtype=torch.int64, device=dev)
                counts[i].index_add_(0, out, torch.ones_like(out, dtype=torch.int32))
        return prompt_mask, counts

    def _collect_logprobs(self, states: list[RequestState], so: SamplerOutput, sampled: np.ndarray,
                          result: RunnerOutput) -> None:
        if so.token_logprob is None:
            return
        want = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        if not want:
            return
        top_ids, top_lp = so.top_ids.cpu().tolist(), so.top_logprobs.cpu().tolist()
        tok_lp, rank = so.token_logprob.cpu().tolist(), so.token_rank.cpu().tolist()
        for i in want:
            n = states[i].params.logprobs
            result.logprobs[states[i].req_id] = TokenLogprobs(int(sampled[i]), tok_lp[i], int(rank[i]),
                                                              top_ids[i][:n], top_lp[i][:n])

    def _prompt_logprobs(self, fb: FlatBatch, logits: torch.Tensor, result: RunnerOutput) -> None:
        lp = torch.log_softmax(logits.to(torch.float32), dim=-1)            # [P', V]
        tgt = torch.from_numpy(fb.prompt_targets).to(lp.device)
        tok_lp = lp.gather(-1, tgt[:, None]).squeeze(-1)                    # [P']
        rank = (lp > tok_lp[:, None]).sum(-1) + 1
        n_max = max(self.batch.requests[int(r)].params.prompt_logprobs or 0 for r in set(fb.prompt_owner.tolist()))
        top_lp, top_ids = torch.topk(lp, n_max, dim=-1) if n_max else (lp[:, :0], lp[:, :0].long())
        top_lp, top_ids = top_lp.cpu().tolist(), top_ids.cpu().tolist()
        tok_lp, rank = tok_lp.cpu().tolist(), rank.cpu().tolist()
        for j, (owner, pos, target) in enumerate(zip(fb.prompt_owner.tolist(), fb.prompt_pos.tolist(),
                                                     fb.prompt_targets.tolist())):
            n = self.batch.requests[owner].params.prompt_logprobs or 0
            result.prompt_logprobs.setdefault(owner, []).append(
                (pos, TokenLogprobs(target, tok_lp[j], int(rank[j]), top_ids[j][:n], top_lp[j][:n])))
