# SPDX-License-Identifier: Apache-2.0
"""The runner's persistent per-request state and the flat batch of one step.

``InputBatch`` keeps, for every request the step messages have introduced, its prompt, its output
tokens so far, its sampling row and seed, and (while it holds KV blocks) a row of a persistent
block table. ``apply(out)`` applies one SchedulerOutput (contract 2): new requests in, finished and
aborted requests out, preempted rows freed, block-table diffs (``block_table_reset`` /
``new_block_ids`` CSR) applied. ``build(out)`` turns it into the flat arrays of
docs/architecture.md with vectorized numpy: no per-token Python loops.

Sampling positions: a row that samples gets one logits row per proposed (speculative) token plus
one after its last token, so the runner can verify k proposals in one forward.

Everything a request needs arrives in the step message; nothing reaches it through a side
channel. Must not import torch, the engine or the scheduler extension.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mindie_llm.contract import NewRequests, SchedulerOutput
from mindie_llm.executor.slot_table import SlotTable

__all__ = ["SamplingRow", "RequestState", "FlatBatch", "InputBatch", "SlotTable"]


@dataclass(slots=True)
class SamplingRow:
    """One request's sampling parameters, as the step message carries them."""

    temperature: float = 1.0
    top_k: int = 0                  # <= 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logprobs: int = -1              # -1: none
    prompt_logprobs: int = -1       # -1: none
    banned: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # ids banned below min_tokens
    bias_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))      # [K] logit_bias token ids
    bias_values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # [K] their biases

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


class RequestState:
    """One request as the runner knows it. Static fields live here; what a step reads (sampling
    arrays, outputs so far, block-table row) lives in the batch's ``SlotTable`` at ``slot``."""

    __slots__ = ("req_id", "prompt_token_ids", "sampling", "seed", "_initial_outputs", "_table", "slot")

    def __init__(self, req_id: int, prompt_token_ids: np.ndarray, sampling: SamplingRow, seed: int,
                 output_token_ids=(), row: int = -1) -> None:
        self.req_id = int(req_id)
        self.prompt_token_ids = prompt_token_ids          # [P] int32
        self.sampling = sampling
        self.seed = int(seed)                             # int64
        self._initial_outputs = np.asarray(output_token_ids, np.int32)
        self._table: SlotTable | None = None
        self.slot = -1

    def attach(self, table: SlotTable) -> None:
        self._table = table
        self.slot = table.add(self.req_id, self.sampling, self.seed, self.num_prompt, self._initial_outputs)

    @property
    def output_token_ids(self) -> np.ndarray:
        """[n] int32 the tokens generated so far (a view; copy it to keep it)."""
        return self._table.output_tokens(self.slot) if self._table is not None else self._initial_outputs

    @property
    def num_output(self) -> int:
        return int(self._table.num_output[self.slot]) if self._table is not None else len(self._initial_outputs)

    @property
    def row(self) -> int:
        """Block-table row while it holds blocks, else -1."""
        return int(self._table.row[self.slot]) if self._table is not None else -1

    @property
    def num_prompt(self) -> int:
        return int(self.prompt_token_ids.shape[0])

    @property
    def want_prompt_logprobs(self) -> bool:
        return self.sampling.prompt_logprobs >= 0


@dataclass
class FlatBatch:
    """numpy arrays of one step (T tokens, B requests, S sampling rows, L logits rows >= S)."""

    input_ids: np.ndarray        # [T] int64
    positions: np.ndarray        # [T] int64
    slot_mapping: np.ndarray     # [T] int64
    query_start_loc: np.ndarray  # [B+1] int32
    seq_lens: np.ndarray         # [B] int32
    block_tables: np.ndarray     # [B, max_blocks_per_seq] int32 (0-padded)
    num_decodes: int             # leading rows with exactly one token
    max_query_len: int
    max_seq_len: int
    logits_indices: np.ndarray   # [L] int64 token rows whose logits are sampled
    logits_offsets: np.ndarray   # [S+1] int32: sampling row i owns logits rows [off[i], off[i+1])
    spec_token_ids: np.ndarray   # [L - S] int32 the proposals the logits rows verify, in order
    sample_req_ids: np.ndarray   # [S] int64
    sample_slots: np.ndarray     # [S] int64 their SlotTable slots
    # prompt_logprobs: extra token rows whose next prompt token is scored.
    prompt_rows: np.ndarray      # [P'] int64 token rows
    prompt_targets: np.ndarray   # [P'] int64 the prompt token at position + 1
    prompt_owner: np.ndarray     # [P'] int64 req id
    prompt_pos: np.ndarray       # [P'] int64 position of the scored token (position + 1)
    # Structured output (from the step message): constrained requests and their packed masks.
    grammar_req_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))    # [G]
    grammar_bitmask: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))    # [G*W]

    @property
    def num_decodes_only(self) -> bool:
        return self.num_decodes == self.seq_lens.shape[0]


def _sampling_row(new: NewRequests, i: int) -> SamplingRow:
    return SamplingRow(
        temperature=float(new.temperature[i]), top_k=int(new.top_k[i]), top_p=float(new.top_p[i]),
        min_p=float(new.min_p[i]), presence_penalty=float(new.presence_penalty[i]),
        frequency_penalty=float(new.frequency_penalty[i]), repetition_penalty=float(new.repetition_penalty[i]),
        min_tokens=int(new.min_tokens[i]), logprobs=int(new.logprobs[i]),
        prompt_logprobs=int(new.prompt_logprobs[i]), banned=np.array(new.banned(i), np.int32),
        bias_ids=np.array(new.logit_bias(i)[0], np.int32), bias_values=np.array(new.logit_bias(i)[1], np.float32))


class InputBatch:
    def __init__(self, max_num_seqs: int, max_model_len: int, block_size: int) -> None:
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        rows = max(max_num_seqs, 1)
        self.block_table = np.zeros((rows, self.max_blocks_per_seq), dtype=np.int32)
        self.num_blocks = np.zeros(rows, dtype=np.int32)
        self._free_rows = list(range(rows - 1, -1, -1))
        self.requests: dict[int, RequestState] = {}
        self.slots = SlotTable(rows, max_model_len)
        self._want_prompt_logprobs: set[int] = set()     # req ids (rare): prompt rows are built for these

    # ------------------------------------------------------------------------------------
    def add(self, state: RequestState) -> None:
        assert state.req_id not in self.requests, state.req_id
        state.attach(self.slots)
        self.requests[state.req_id] = state
        if state.want_prompt_logprobs:
            self._want_prompt_logprobs.add(state.req_id)

    def remove(self, req_id: int) -> None:
        st = self.requests.pop(int(req_id), None)
        if st is not None:
            self._release_row(st)
            self.slots.remove(st.req_id, st.slot)
            self._want_prompt_logprobs.discard(st.req_id)

    def _release_row(self, st: RequestState) -> None:
        r = int(self.slots.row[st.slot])
        if r >= 0:
            self.num_blocks[r] = 0
            self._free_rows.append(r)
            self.slots.row[st.slot] = -1

    def _take_row(self) -> int:
        if not self._free_rows:  # more requests hold blocks than max_num_seqs: grow
            old = self.block_table.shape[0]
            self.block_table = np.concatenate([self.block_table, np.zeros_like(self.block_table)])
            self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()

    # ------------------------------------------------------------------------------------
    def add_new(self, new: NewRequests) -> None:
        """Introduces the requests of a step message (admission: the only per-request loop)."""
        for i, rid in enumerate(new.req_ids.tolist()):
            self.add(RequestState(rid, np.array(new.prompt(i), np.int32), _sampling_row(new, i),
                                  int(new.seeds[i]), new.outputs(i)))

    def apply(self, out: SchedulerOutput) -> None:
        """Applies one step message: new requests added, then ``apply_diffs``."""
        self.add_new(out.new_requests)
        self.apply_diffs(out)

    def apply_diffs(self, out: SchedulerOutput) -> None:
        """Drops finished and aborted requests, frees preempted rows, applies block-table diffs
        (vectorized over the rows: new rows, resets, CSR appends)."""
        for rid in np.asarray(out.finished_ids).tolist():
            self.remove(rid)
        for rid in np.asarray(out.preempted_ids).tolist():
            st = self.requests.get(rid)
            if st is not None:
                self._release_row(st)
        if not len(out.req_ids):
            return
        slots = self.slots.slots_of(out.req_ids)                          # [B]
        rows = self.slots.row[slots]                                      # [B]
        for i in np.flatnonzero(rows < 0).tolist():                       # rows taken (admission, resume)
            r = self._take_row()
            self.num_blocks[r] = 0
            self.slots.row[slots[i]] = rows[i] = r
        reset = np.asarray(out.block_table_reset, bool)
        if reset.any():
            self.num_blocks[rows[reset]] = 0
        offs = np.asarray(out.new_block_offsets, np.int64)                # [B+1]
        if offs[-1] > offs[0]:
            counts = np.diff(offs)                                        # [B]
            owner = np.repeat(np.arange(rows.shape[0]), counts)           # [K]
            col = self.num_blocks[rows][owner] + np.arange(int(offs[-1] - offs[0])) - (offs[owner] - offs[0])
            assert (col < self.max_blocks_per_seq).all(), "block table overflow"
            self.block_table[rows[owner], col] = np.asarray(out.new_block_ids)[offs[0]:offs[-1]]
            self.num_blocks[rows] += counts.astype(np.int32)

    def build(self, out: SchedulerOutput) -> FlatBatch:
        """The flat batch of ``out`` (call after ``apply``)."""
        req_ids = np.asarray(out.req_ids, dtype=np.int64)                # [B]
        nsched = np.asarray(out.num_scheduled_tokens, dtype=np.int64)    # [B]
        ncomp = np.asarray(out.num_computed_tokens, dtype=np.int64)      # [B]
        smask = np.asarray(out.sample_mask, dtype=bool)                  # [B]
        spec_offs = np.asarray(out.spec_offsets, dtype=np.int64)         # [B+1]
        nspec = np.diff(spec_offs)                                       # [B]
        B = req_ids.shape[0]
        slots = self.slots.slots_of(req_ids) if B else np.zeros(0, np.int64)   # [B]
        rows = self.slots.row[slots]                                     # [B]
        qsl = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(nsched, out=qsl[1:])
        T = int(qsl[-1])
        tok_req = np.repeat(np.arange(B), nsched)                        # [T]
        positions = np.arange(T, dtype=np.int64) - qsl[tok_req] + ncomp[tok_req]   # [T]
        bt = self.block_table[rows]                                      # [B, max_blocks]
        blk = bt[tok_req, positions // self.block_size].astype(np.int64)
        slot_mapping = blk * self.block_size + positions % self.block_size
        seq_lens = (ncomp + nsched).astype(np.int32)
        num_decodes = int(np.argmax(nsched != 1)) if (nsched != 1).any() else B
        # Logits rows: the last 1 + k tokens of each sampling row (k = its proposals).
        per_row = (nspec + 1)[smask]                                     # [S]
        logits_offsets = np.zeros(per_row.shape[0] + 1, np.int32)
        np.cumsum(per_row, out=logits_offsets[1:])
        L = int(logits_offsets[-1])
        owner = np.repeat(np.arange(per_row.shape[0]), per_row)          # [L]
        within = np.arange(L) - logits_offsets[owner]                     # [L] 0..k
        ends = qsl[1:][smask]                                            # [S] one past each row's last token
        logits_indices = (ends[owner] - per_row[owner] + within).astype(np.int64)
        if nspec[smask].any():
            spec = np.asarray(out.spec_token_ids, np.int32)
            keep = np.repeat(smask, nspec)                               # [spec] proposals of sampling rows
            spec_tokens = spec[spec_offs[0]:spec_offs[-1]][keep]
        else:
            spec_tokens = np.zeros(0, np.int32)
        # prompt_logprobs: score prompt tokens at positions p+1 < P for every computed row p (the
        # few requests that ask for them).
        pr_rows, pr_tgt, pr_owner, pr_pos = [], [], [], []
        if self._want_prompt_logprobs:
            ask = (self.slots.prompt_logprobs[slots] >= 0) & (ncomp < self.slots.num_prompt[slots] - 1)
            for i in np.flatnonzero(ask).tolist():
                st = self.requests[int(req_ids[i])]
                lo = int(ncomp[i])
                hi = min(int(ncomp[i] + nsched[i]), st.num_prompt - 1)
                if hi <= lo:
                    continue
                p = np.arange(lo, hi, dtype=np.int64)
                pr_rows.append(qsl[i] + (p - lo))
                pr_tgt.append(st.prompt_token_ids[p + 1].astype(np.int64))
                pr_owner.append(np.full(p.shape, st.req_id, dtype=np.int64))
                pr_pos.append(p + 1)
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64))
        return FlatBatch(
            input_ids=np.asarray(out.input_token_ids, dtype=np.int64),
            positions=positions, slot_mapping=slot_mapping,
            query_start_loc=qsl.astype(np.int32), seq_lens=seq_lens,
            block_tables=bt, num_decodes=num_decodes,
            max_query_len=int(nsched.max()) if B else 0, max_seq_len=int(seq_lens.max()) if B else 0,
            logits_indices=logits_indices, logits_offsets=logits_offsets, spec_token_ids=spec_tokens,
            sample_req_ids=req_ids[smask], sample_slots=slots[smask],
            prompt_rows=cat(pr_rows), prompt_targets=cat(pr_tgt), prompt_owner=cat(pr_owner), prompt_pos=cat(pr_pos),
            grammar_req_ids=np.asarray(getattr(out, "grammar_req_ids", np.zeros(0, np.int64))),
            grammar_bitmask=np.asarray(getattr(out, "grammar_bitmask", np.zeros(0, np.int32))))
