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
from mindie_llm.executor.input_batch import FlatBatch, InputBatch
from mindie_llm.executor.penalty_state import PenaltyState
from mindie_llm.executor.step_ahead import AheadStep, is_plain_decode, match, predict_next
from mindie_llm.layers.sampler import Sampler, SamplerOutput, SamplingMetadata
from mindie_llm.ops.attention_metadata import AttentionMetadata

__all__ = ["ModelRunner", "SamplingPositions"]


class SamplingPositions:
    """The logits rows of one step, each tied to a slot and to the proposals before it.

    Row r belongs to sampling row ``owner[r]`` (slot ``slots[r]``) and samples output position
    ``num_output[slot] + within[r]``, after the first ``within[r]`` proposals of its row."""

    def __init__(self, fb: FlatBatch) -> None:
        offs = fb.logits_offsets
        self.num_rows = int(offs[-1])                                   # L
        counts = np.diff(offs)                                          # [S]
        self.owner = np.repeat(np.arange(counts.shape[0]), counts)      # [L]
        self.within = np.arange(self.num_rows) - offs[self.owner]       # [L]
        self.slots = fb.sample_slots[self.owner]                        # [L] int64
        self.spec_offsets = offs - np.arange(offs.shape[0])             # [S+1] proposals per row (CSR)
        self.spec = fb.spec_token_ids                                   # [L - S]
        self.has_spec = bool(self.spec.shape[0])
        self.grammar_req_ids = fb.grammar_req_ids                       # [G] int64
        self.grammar_bitmask = fb.grammar_bitmask                       # [G*W] int32
        self.req_ids = fb.sample_req_ids[self.owner]                    # [L] int64

    def preceding_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(logits row, token) of every proposal that comes before a logits row of its request:
        [K] int64 each, K = sum(within)."""
        w = self.within
        rows = np.repeat(np.arange(self.num_rows), w)                   # [K]
        start = np.zeros(self.num_rows, np.int64)
        np.cumsum(w[:-1], out=start[1:])
        j = np.arange(rows.shape[0]) - start[rows]                      # [K] 0..within-1
        tok = self.spec[self.spec_offsets[self.owner[rows]] + j]
        return rows, tok.astype(np.int64)


class ModelRunner:
    def __init__(self, model: nn.Module, vocab_size: int, kv_caches: list[torch.Tensor], *, block_size: int,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 device: torch.device, async_scheduling: bool = False) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.max_model_len = max_model_len
        self.batch = InputBatch(max_num_seqs, max_model_len, block_size)
        self.sampler = Sampler()
        self.penalties = PenaltyState(vocab_size, device)     # allocated on the first penalized request
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
        # Asynchronous scheduling (step_ahead.py): the decode step queued one step early.
        self.async_scheduling = bool(async_scheduling)
        self._ahead: AheadStep | None = None
        self.num_ahead_used = 0          # steps whose message matched the queued step
        self.num_ahead_dropped = 0       # queued steps discarded (the message differed)
        self.num_ahead_trimmed = 0       # of the used ones, those without rows that had finished
        self.step_timer = None           # a StepTimer (step_timer.py) while the idle time is measured

    def set_async_scheduling(self, on: bool) -> None:
        """Switches asynchronous scheduling between runs (benchmarks); the scheduler must hand out
        lookahead slots while it is on. Drops any step queued ahead."""
        self.async_scheduling = bool(on)
        self._ahead = None

    def has_request(self, req_id: int) -> bool:
        return req_id in self.batch.requests

    # ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        try:
            return self._execute_async(out) if self.async_scheduling else self._execute(out)
        finally:
            if self.step_timer is not None:
                self.step_timer.step_end()

    def _execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """The synchronous step: apply, build, forward, sample, return."""
        self.apply(out)
        if out.num_reqs == 0:
            return ModelRunnerOutput.empty()
        fb = self.batch.build(out)
        input_ids, positions, md = self._prepare(fb)
        hidden = self.model(input_ids, positions, self.kv_caches, md)        # [T, H]
        return self.sample_and_verify(fb, hidden)

    # ------------------------------------------------------------------------------------ async
    def _execute_async(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Asynchronous scheduling (step_ahead.py): use the step queued during the last call when
        ``out`` is it (or it without some rows), queue the next one, then read this one's tokens."""
        ahead, self._ahead = self._ahead, None
        keep = match(ahead, out) if ahead is not None else None
        self.apply(out)
        if out.num_reqs == 0:
            return ModelRunnerOutput.empty()
        if keep is not None:
            self.num_ahead_used += 1
            so = ahead.launched
            if keep.shape[0] != ahead.req_ids.shape[0]:      # rows finished at the last step: drop theirs
                self.num_ahead_trimmed += 1
                so = _take_rows(so, torch.from_numpy(keep).to(self.device))
            slots = self.batch.slots.slots_of(out.req_ids)
            self._count_penalized(slots, so.sampled)          # the step is real now
            req_ids = np.asarray(out.req_ids, np.int64)
        else:
            self.num_ahead_dropped += ahead is not None
            fb = self.batch.build(out)
            if not is_plain_decode(out):                      # prefill, mixed, proposals, grammar
                input_ids, positions, md = self._prepare(fb)
                return self.sample_and_verify(fb, self.model(input_ids, positions, self.kv_caches, md))
            so = self._launch(fb, None, ahead=0)
            req_ids, slots = fb.sample_req_ids, fb.sample_slots
        nxt = self._queue_ahead(out, so.sampled)               # step n+1 behind step n on the device
        result = self._collect(req_ids, slots, so)             # the host sync
        if nxt is not None:
            nxt.prev_tokens = result.token_ids.astype(np.int64)
            self._ahead = nxt
        return result

    def _queue_ahead(self, out: SchedulerOutput, sampled: torch.Tensor) -> AheadStep | None:
        """Queues the predicted next decode of ``out``'s rows, inputs from ``sampled`` ([B] int64
        on the device), when every row already holds the block of its next position."""
        if not is_plain_decode(out):
            return None
        tab = self.batch.slots
        rows = tab.row[tab.slots_of(out.req_ids)]
        nxt = np.asarray(out.num_computed_tokens, np.int64) + 1              # [B] next position
        if (nxt + 1 > self.max_model_len).any() or (self.batch.num_blocks[rows] * self.block_size <= nxt).any():
            return None
        pred = predict_next(out)
        fb = self.batch.build(pred)
        so = self._launch(fb, sampled, ahead=1)
        return AheadStep(pred.req_ids, nxt, np.zeros(0, np.int64), so)

    def _launch(self, fb: FlatBatch, prev_tokens: torch.Tensor | None, ahead: int) -> SamplerOutput:
        """Queues a plain decode step: forward and sampling, on the device, no host sync.
        ``prev_tokens`` ([B] int64, device): input tokens that are not on the host yet."""
        logits = self._step_logits(fb, prev_tokens)                          # [B, V]
        pos = SamplingPositions(fb)
        so = self.sampler(logits, self._sampling_metadata(pos, ahead))
        if not ahead:
            self._count_penalized(pos.slots, so.sampled)
        return so

    def _step_logits(self, fb: FlatBatch, prev_tokens: torch.Tensor | None) -> torch.Tensor:
        """Logits of a plain decode step's rows ([B, V]); a graph runner replays a graph here."""
        input_ids, positions, md = self._prepare(fb)
        if prev_tokens is not None:
            input_ids[:prev_tokens.shape[0]].copy_(prev_tokens)
        hidden = self.model(input_ids, positions, self.kv_caches, md)        # [T, H]
        idx = torch.from_numpy(fb.logits_indices).to(self.device)
        return self.model.compute_logits(hidden.index_select(0, idx))

    def _collect(self, req_ids: np.ndarray, slots: np.ndarray, so: SamplerOutput) -> ModelRunnerOutput:
        """Reads a plain decode step's tokens (one per row) and logprobs; appends the tokens."""
        sampled = so.sampled.to("cpu", torch.int32).numpy()                  # [B] the host sync
        result = ModelRunnerOutput.one_token_each(req_ids, sampled)
        if so.token_logprob is not None:
            result.token_logprobs = so.token_logprob.cpu().numpy()
            result.token_ranks = so.token_rank.cpu().numpy()
            result.top_ids = so.top_ids.cpu().numpy()
            result.top_logprobs = so.top_logprobs.cpu().numpy()
            result.logprob_rows = self.batch.slots.logprobs[slots] >= 0
        self.batch.slots.append(slots, result.token_offsets, result.token_ids)
        return result

    def apply(self, out: SchedulerOutput) -> None:
        """The step message's state changes: the batch's (requests, rows, blocks), then the
        device-side penalty state of new penalized requests (admission: the only per-request loop)."""
        self.batch.apply(out)
        new = out.new_requests
        if new.num_reqs and self.batch.slots.has_penalties.any():
            tab = self.batch.slots
            for rid in new.req_ids.tolist():
                st = self.batch.requests[rid]
                if tab.has_penalties[st.slot]:
                    self.penalties.admit(st.slot, tab.capacity, st.prompt_token_ids, st.output_token_ids)

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
            if not pos.has_spec:
                self._count_penalized(pos.slots, so.sampled)                    # on the device, no sync
            sampled = so.sampled.to("cpu", torch.int32).numpy()               # [L] the host sync
            keep = self._accept(pos, sampled, result)
            if pos.has_spec:
                self._count_penalized(pos.slots[keep], torch.from_numpy(result.token_ids).to(self.device))
            self._collect_logprobs(pos, so, keep, result)
            self.batch.slots.append(fb.sample_slots, result.token_offsets, result.token_ids)
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
        if self.step_timer is not None:
            self.step_timer.device_begin()
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
    def _count_penalized(self, slots: np.ndarray, tokens: torch.Tensor) -> None:
        """Adds the kept tokens of penalized rows to their slots' counts ([K] slots, [K] tokens)."""
        pen = self.batch.slots.has_penalties[slots]
        if self.penalties.counts is None or not pen.any():
            return
        idx = np.flatnonzero(pen)
        dev_idx = torch.from_numpy(idx).to(self.device)
        self.penalties.add(torch.from_numpy(slots[idx]).to(self.device), tokens.index_select(0, dev_idx))

    def _sampling_metadata(self, pos: SamplingPositions, ahead: int = 0) -> SamplingMetadata:
        """Gathers the step's rows out of the slot table (no per-request loop). ``ahead``: tokens
        each row has sampled that the table does not hold yet (a step queued one step early)."""
        tab, sl, dev = self.batch.slots, pos.slots, self.device               # sl [L]
        L = sl.shape[0]
        temp, top_k, top_p, min_p = tab.temperature[sl], tab.top_k[sl], tab.top_p[sl], tab.min_p[sl]
        out_pos = tab.num_output[sl] + pos.within + ahead                     # [L]
        t = (lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev))
        rand = temp > 0
        md = SamplingMetadata(
            temperature=t(temp), top_k=t(top_k), top_p=t(top_p), min_p=t(min_p),
            seeds=tab.seed[sl].tolist(), output_positions=out_pos.tolist(),
            all_greedy=not rand.any(), random_rows=np.flatnonzero(rand).tolist(),
            need_top_k_top_p=bool((((top_k > 0) | (top_p < 1)) & rand).any()),
            need_min_p=bool(((min_p > 0) & rand).any()),
        )
        md.max_num_logprobs = int(tab.logprobs[sl].max()) if L else -1
        if tab.has_penalties[sl].any():
            md.presence = t(tab.presence_penalty[sl])
            md.frequency = t(tab.frequency_penalty[sl])
            md.repetition = t(tab.repetition_penalty[sl])
            md.prompt_mask, md.output_counts = self._token_stats(pos)
        if tab.ban.shape[1]:     # min_tokens: ban lists of the rows still below it
            below = np.flatnonzero(out_pos < tab.min_tokens[sl])
            if below.size:
                ban = tab.ban[sl[below]]                                      # [R, Wb]
                ok = (ban >= 0) & (ban < self.vocab_size)
                if ok.any():
                    md.banned_rows = t(np.repeat(below, ok.sum(1)).astype(np.int64))
                    md.banned_tokens = t(ban[ok].astype(np.int64))
        if tab.has_bias[sl].any():   # logit_bias maps of the rows (ids outside the vocabulary dropped)
            ids = tab.bias_ids[sl]                                            # [L, Wl]
            ok = (ids >= 0) & (ids < self.vocab_size)
            md.bias_rows = t(np.nonzero(ok)[0].astype(np.int64))
            md.bias_tokens = t(ids[ok].astype(np.int64))
            md.bias_values = t(tab.bias_values[sl][ok])
        G = int(pos.grammar_req_ids.shape[0])
        if G:   # structured output: each constrained request's mask on its logits rows, the rest all-allowed
            words = -(-self.vocab_size // 32)
            masks = pos.grammar_bitmask.reshape(G, -1)
            if masks.shape[1] != words:
                raise ValueError(f"grammar_bitmask: {masks.shape[1]} words per row, the vocabulary needs {words}")
            order = np.argsort(pos.grammar_req_ids, kind="stable")
            gid = pos.grammar_req_ids[order]
            at = np.minimum(np.searchsorted(gid, pos.req_ids), G - 1)         # [L]
            hit = gid[at] == pos.req_ids
            full = np.full((L, words), -1, np.int32)                          # [L, W]
            full[hit] = masks[order[at[hit]]]
            md.token_bitmask = t(full)
        return md

    def _token_stats(self, pos: SamplingPositions) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt-token mask and output-token counts [L, V] of each logits row (its request's
        outputs so far plus the proposals before that row), gathered from the penalty state."""
        dev = self.device
        self.penalties.ensure(self.batch.slots.capacity)
        prompt_mask, counts = self.penalties.gather(torch.from_numpy(pos.slots).to(dev))
        if pos.has_spec:
            rows, tok = pos.preceding_pairs()
            if rows.size:
                one = torch.ones(rows.shape[0], dtype=torch.int32, device=dev)
                counts.index_put_((torch.from_numpy(rows).to(dev), torch.from_numpy(tok).to(dev)), one,
                                  accumulate=True)
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
        first_rows = pos.spec_offsets[:-1] + np.arange(pos.spec_offsets.shape[0] - 1)      # [S]
        result.logprob_rows = self.batch.slots.logprobs[pos.slots[first_rows]] >= 0

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


def _take_rows(so: SamplerOutput, idx: torch.Tensor) -> SamplerOutput:
    """The rows ``idx`` ([k] int64, device) of a sampler output."""
    pick = (lambda t: None if t is None else t.index_select(0, idx))
    return SamplerOutput(sampled=so.sampled.index_select(0, idx), top_ids=pick(so.top_ids),
                         top_logprobs=pick(so.top_logprobs), token_logprob=pick(so.token_logprob),
                         token_rank=pick(so.token_rank))
