# SPDX-License-Identifier: Apache-2.0
"""The step contract: the messages that cross the engine -> executor -> worker seam each step.

Owns the three message types of docs/architecture.md and their wire form:

- ``NewRequests``: what a worker needs to know about a request the first time it sees it (prompt,
  tokens already generated, sampling parameters as flat arrays, seed, the min-tokens ban list, the
  ``logit_bias`` map as a CSR pair of token ids and biases).
- ``SchedulerOutput`` (contract 2): one step's plan, everything a worker needs and nothing it
  fetches elsewhere: rows in batch order, tokens to compute per row (with any proposed
  speculative tokens as a CSR pair), block-table changes, new requests, and the ids finished,
  aborted or preempted.
- ``ModelRunnerOutput`` (contract 3): a variable number of tokens per sampling row (CSR) with their
  logprobs, and proposals for the next step.

``SchedulerOutput.encode()`` turns a message into two flat arrays (int64, float32) and
``SchedulerOutput.decode()`` checks every count and offset before it builds arrays from them, so
the same message can be broadcast to other processes without pickle.

Plain numpy only: must not import torch, the C++ extension, the engine or the executor.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields

import numpy as np

__all__ = ["FinishReason", "NewRequests", "SchedulerOutput", "ModelRunnerOutput", "PromptLogprobs",
           "ContractError", "csr_offsets", "LOGIT_BIAS_MAX"]


class FinishReason(enum.IntEnum):
    """Why a request stopped. The values are the C++ core's (a test checks they agree)."""

    NONE = 0
    EOS = 1
    STOP_TOKEN = 2
    STOP_STRING = 3
    LENGTH = 4            # max_tokens
    MAX_MODEL_LEN = 5
    ABORTED = 6
    PREFILL_DONE = 7      # prefill role: KV kept until release(id)


class ContractError(ValueError):
    """A step message is malformed (wrong counts, offsets or sizes)."""


def csr_offsets(lengths) -> np.ndarray:
    """[N] lengths -> [N+1] int32 offsets."""
    out = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=out[1:])
    return out


def _empty(dtype) -> np.ndarray:
    return np.zeros(0, dtype)


def _zeros_offsets(n: int = 0) -> np.ndarray:
    return np.zeros(n + 1, np.int32)


@dataclass(slots=True)
class NewRequests:
    """Requests the workers see for the first time this step (N rows, struct of arrays)."""

    req_ids: np.ndarray = field(default_factory=lambda: _empty(np.int64))             # int64[N]
    prompt_offsets: np.ndarray = field(default_factory=_zeros_offsets)                # int32[N+1]
    prompt_token_ids: np.ndarray = field(default_factory=lambda: _empty(np.int32))    # int32[*]
    output_offsets: np.ndarray = field(default_factory=_zeros_offsets)                # int32[N+1]
    output_token_ids: np.ndarray = field(default_factory=lambda: _empty(np.int32))    # int32[*] already generated
    seeds: np.ndarray = field(default_factory=lambda: _empty(np.int64))               # int64[N]
    temperature: np.ndarray = field(default_factory=lambda: _empty(np.float32))       # f32[N], 0 = greedy
    top_k: np.ndarray = field(default_factory=lambda: _empty(np.int32))               # int32[N], <= 0 = off
    top_p: np.ndarray = field(default_factory=lambda: _empty(np.float32))             # f32[N]
    min_p: np.ndarray = field(default_factory=lambda: _empty(np.float32))             # f32[N]
    presence_penalty: np.ndarray = field(default_factory=lambda: _empty(np.float32))  # f32[N]
    frequency_penalty: np.ndarray = field(default_factory=lambda: _empty(np.float32))  # f32[N]
    repetition_penalty: np.ndarray = field(default_factory=lambda: _empty(np.float32))  # f32[N]
    min_tokens: np.ndarray = field(default_factory=lambda: _empty(np.int32))          # int32[N]
    logprobs: np.ndarray = field(default_factory=lambda: _empty(np.int32))            # int32[N], -1 = none
    prompt_logprobs: np.ndarray = field(default_factory=lambda: _empty(np.int32))     # int32[N], -1 = none
    ban_offsets: np.ndarray = field(default_factory=_zeros_offsets)                   # int32[N+1]
    ban_token_ids: np.ndarray = field(default_factory=lambda: _empty(np.int32))       # int32[*] banned while
    #                                     len(output) < min_tokens (stop ids, and EOS unless ignore_eos)
    bias_offsets: np.ndarray = field(default_factory=_zeros_offsets)                  # int32[N+1]
    bias_token_ids: np.ndarray = field(default_factory=lambda: _empty(np.int32))      # int32[*] logit_bias keys,
    #                                     distinct within a request, >= 0 (the runner drops ids >= its vocab)
    bias_values: np.ndarray = field(default_factory=lambda: _empty(np.float32))       # f32[*] added to those
    #                                     logits, each in [-LOGIT_BIAS_MAX, LOGIT_BIAS_MAX]

    @property
    def num_reqs(self) -> int:
        return int(self.req_ids.shape[0])

    def prompt(self, i: int) -> np.ndarray:
        return self.prompt_token_ids[self.prompt_offsets[i]:self.prompt_offsets[i + 1]]

    def outputs(self, i: int) -> np.ndarray:
        return self.output_token_ids[self.output_offsets[i]:self.output_offsets[i + 1]]

    def banned(self, i: int) -> np.ndarray:
        return self.ban_token_ids[self.ban_offsets[i]:self.ban_offsets[i + 1]]

    def logit_bias(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids int32[K], biases f32[K]) of request i."""
        lo, hi = self.bias_offsets[i], self.bias_offsets[i + 1]
        return self.bias_token_ids[lo:hi], self.bias_values[lo:hi]


# (name, dtype, length rule) of every array in wire order. Length rules: a count name ("B", "N",
# ...), "B+1"/"N+1" for offsets, or "*name" for the length an offsets array ends at.
_INT_SCHEMA = (
    ("req_ids", np.int64, "B"), ("num_scheduled_tokens", np.int32, "B"),
    ("num_computed_tokens", np.int32, "B"), ("input_token_ids", np.int32, "T"),
    ("spec_offsets", np.int32, "B+1"), ("spec_token_ids", np.int32, "*spec_offsets"),
    ("sample_mask", np.bool_, "B"), ("block_table_reset", np.bool_, "B"),
    ("new_block_offsets", np.int32, "B+1"), ("new_block_ids", np.int32, "*new_block_offsets"),
    ("preempted_ids", np.int64, "P"), ("finished_ids", np.int64, "F"), ("finish_reasons", np.int32, "F"),
    ("new.req_ids", np.int64, "N"), ("new.prompt_offsets", np.int32, "N+1"),
    ("new.prompt_token_ids", np.int32, "*new.prompt_offsets"), ("new.output_offsets", np.int32, "N+1"),
    ("new.output_token_ids", np.int32, "*new.output_offsets"), ("new.seeds", np.int64, "N"),
    ("new.top_k", np.int32, "N"), ("new.min_tokens", np.int32, "N"), ("new.logprobs", np.int32, "N"),
    ("new.prompt_logprobs", np.int32, "N"), ("new.ban_offsets", np.int32, "N+1"),
    ("new.ban_token_ids", np.int32, "*new.ban_offsets"),
    ("grammar_req_ids", np.int64, "G"), ("grammar_bitmask", np.int32, "GW"),
    ("new.bias_offsets", np.int32, "N+1"), ("new.bias_token_ids", np.int32, "*new.bias_offsets"),
)
_FLOAT_SCHEMA = (
    ("new.temperature", np.float32, "N"), ("new.top_p", np.float32, "N"), ("new.min_p", np.float32, "N"),
    ("new.presence_penalty", np.float32, "N"), ("new.frequency_penalty", np.float32, "N"),
    ("new.repetition_penalty", np.float32, "N"), ("new.bias_values", np.float32, "*new.bias_offsets"),
)
_MAGIC, _VERSION = 0x4D494E4449455354, 4      # "MINDIEST", contract v2 (+ grammar bitmask, + logit_bias)
LOGIT_BIAS_MAX = 100.0                        # |bias| bound (OpenAI's), checked again by decode()
_COUNTS = ("B", "T", "P", "F", "N", "G", "GW")
_HEADER = 2 + len(_COUNTS)
_MAX_ELEMS = 1 << 40                          # no field of a real step is ever this long


@dataclass(slots=True)
class SchedulerOutput:
    """One step's plan (B scheduled rows, T tokens). Rows are in batch order: decodes first, then
    prefill chunks. Arrays may be read-only views over a buffer owned by the C++ core."""

    req_ids: np.ndarray               # int64[B]
    num_scheduled_tokens: np.ndarray  # int32[B] 1 for a decode (+ k proposed), the chunk for a prefill
    num_computed_tokens: np.ndarray   # int32[B] position of each row's first scheduled token
    input_token_ids: np.ndarray       # int32[T] the tokens to compute, concatenated in batch order
    sample_mask: np.ndarray           # bool[B] True: samples after this step
    block_table_reset: np.ndarray     # bool[B] True: the row restarts from new_block_ids
    new_block_offsets: np.ndarray     # int32[B+1] CSR offsets into new_block_ids
    new_block_ids: np.ndarray         # int32[*] blocks appended to each row this step
    preempted_ids: np.ndarray         # int64[P] preempted (by recompute) in this step
    finished_ids: np.ndarray          # int64[F] finished or aborted since the last step: drop their state
    finish_reasons: np.ndarray        # int32[F] FinishReason of each finished_ids entry
    num_batched_tokens: int           # T
    spec_offsets: np.ndarray = field(default_factory=_zeros_offsets)  # int32[B+1]
    spec_token_ids: np.ndarray = field(default_factory=lambda: _empty(np.int32))  # int32[*] proposed tokens:
    #                                          the last spec_len(i) tokens of row i inside input_token_ids
    new_requests: NewRequests = field(default_factory=NewRequests)
    # Structured output: the rows of these requests sample under a token mask, packed 32 tokens per
    # int32 (bit t%32 of word t//32 set = token t allowed), W = ceil(V/32) words per request.
    grammar_req_ids: np.ndarray = field(default_factory=lambda: _empty(np.int64))   # int64[G]
    grammar_bitmask: np.ndarray = field(default_factory=lambda: _empty(np.int32))   # int32[G*W] (flat)

    def __post_init__(self) -> None:
        if len(self.spec_offsets) != len(self.req_ids) + 1:   # a plan without speculation
            self.spec_offsets = np.zeros(len(self.req_ids) + 1, np.int32)

    @property
    def num_reqs(self) -> int:
        """B, the number of scheduled rows."""
        return int(self.req_ids.shape[0])

    @classmethod
    def empty(cls) -> "SchedulerOutput":
        z64, z32, zb = _empty(np.int64), _empty(np.int32), _empty(np.bool_)
        return cls(z64, z32, z32, z32, zb, zb, _zeros_offsets(), z32, z64, z64, z32, 0)

    # -------------------------------------------------------------------------------- wire form
    def _get(self, name: str) -> np.ndarray:
        if name.startswith("new."):
            return getattr(self.new_requests, name[4:])
        return getattr(self, name)

    def encode(self) -> tuple[np.ndarray, np.ndarray]:
        """(int64[*], float32[*]): a header (magic, version, counts) and every array in a fixed
        order. No pickle, no Python objects."""
        counts = {"B": self.num_reqs, "T": int(len(self.input_token_ids)), "P": int(len(self.preempted_ids)),
                  "F": int(len(self.finished_ids)), "N": self.new_requests.num_reqs,
                  "G": int(len(self.grammar_req_ids)), "GW": int(np.asarray(self.grammar_bitmask).size)}
        head = np.array([_MAGIC, _VERSION] + [counts[c] for c in _COUNTS], np.int64)
        ints = np.concatenate([head] + [np.asarray(self._get(n)).astype(np.int64).ravel()
                                        for n, _, _ in _INT_SCHEMA])
        floats = np.concatenate([np.asarray(self._get(n), np.float32).ravel() for n, _, _ in _FLOAT_SCHEMA])
        return ints, floats.astype(np.float32, copy=False)

    @classmethod
    def decode(cls, ints: np.ndarray, floats: np.ndarray) -> "SchedulerOutput":
        """Rebuilds a message from ``encode()``'s arrays; ContractError on anything inconsistent
        (header, counts, offsets that do not start at 0, decrease or end past their array, values
        outside their dtype, scheduled tokens that do not add up)."""
        ints, floats = np.asarray(ints), np.asarray(floats)
        if ints.dtype != np.int64 or ints.ndim != 1 or floats.dtype != np.float32 or floats.ndim != 1:
            raise ContractError("step message: expected 1-D int64 and float32 arrays")
        if ints.shape[0] < _HEADER or int(ints[0]) != _MAGIC or int(ints[1]) != _VERSION:
            raise ContractError("step message: bad header (magic or version)")
        counts = {c: int(v) for c, v in zip(_COUNTS, ints[2:_HEADER].tolist())}
        for c, v in counts.items():
            if not 0 <= v < _MAX_ELEMS:
                raise ContractError(f"step message: count {c}={v} is out of range")
        values: dict[str, np.ndarray] = {}
        for source, schema, pos in ((ints, _INT_SCHEMA, _HEADER), (floats, _FLOAT_SCHEMA, 0)):
            for name, dtype, rule in schema:
                n = _length(rule, counts, values)
                if pos + n > source.shape[0]:
                    raise ContractError(f"step message: {name} runs past the end of the message")
                values[name] = _cast(name, source[pos:pos + n], dtype)
                pos += n
            if pos != source.shape[0]:
                raise ContractError(f"step message: {source.shape[0] - pos} trailing elements")
        nsched = values["num_scheduled_tokens"]
        if (nsched < 0).any() or int(nsched.astype(np.int64).sum()) != counts["T"]:
            raise ContractError("step message: num_scheduled_tokens do not add up to T")
        if (np.diff(values["spec_offsets"].astype(np.int64)) > nsched).any():
            raise ContractError("step message: a row has more proposed tokens than scheduled tokens")
        if counts["G"] and counts["GW"] % counts["G"]:
            raise ContractError("step message: grammar_bitmask is not G rows of equal width")
        _check_logit_bias(values["new.bias_offsets"], values["new.bias_token_ids"], values["new.bias_values"])
        new = NewRequests(**{f.name: values["new." + f.name] for f in fields(NewRequests)})
        top = {n: values[n] for n, _, _ in _INT_SCHEMA if not n.startswith("new.")}
        return cls(num_batched_tokens=counts["T"], new_requests=new, **top)


def _check_logit_bias(offsets: np.ndarray, token_ids: np.ndarray, biases: np.ndarray) -> None:
    """Token ids >= 0 and distinct within each request; biases finite and within the bound."""
    if not token_ids.size:
        return
    if int(token_ids.min()) < 0:
        raise ContractError("step message: new.bias_token_ids has a negative token id")
    if not np.isfinite(biases).all() or float(np.abs(biases).max()) > LOGIT_BIAS_MAX:
        raise ContractError(f"step message: new.bias_values must be finite and within +-{LOGIT_BIAS_MAX:g}")
    owner = np.repeat(np.arange(offsets.shape[0] - 1), np.diff(offsets.astype(np.int64)))      # [K]
    key = np.sort(owner * (1 << 32) + token_ids.astype(np.int64))
    if (np.diff(key) == 0).any():
        raise ContractError("step message: new.bias_token_ids repeats a token id within a request")


def _length(rule: str, counts: dict[str, int], values: dict[str, np.ndarray]) -> int:
    if rule.startswith("*"):
        offs = values[rule[1:]]
        if int(offs[0]) != 0 or (np.diff(offs.astype(np.int64)) < 0).any():
            raise ContractError(f"step message: {rule[1:]} must start at 0 and not decrease")
        return int(offs[-1])
    if rule.endswith("+1"):
        return counts[rule[:-2]] + 1
    return counts[rule]


def _cast(name: str, raw: np.ndarray, dtype) -> np.ndarray:
    if raw.dtype == dtype:
        return raw.copy()
    if dtype == np.bool_:
        if ((raw != 0) & (raw != 1)).any():
            raise ContractError(f"step message: {name} must hold 0 or 1")
        return raw.astype(np.bool_)
    if np.issubdtype(dtype, np.integer) and raw.size:
        info = np.iinfo(dtype)
        if int(raw.min()) < info.min or int(raw.max()) > info.max:
            raise ContractError(f"step message: {name} has a value outside {np.dtype(dtype).name}")
    return raw.astype(dtype)


@dataclass(slots=True)
class PromptLogprobs:
    """Scored prompt positions of one request in one step (P' entries)."""

    positions: np.ndarray       # int64[P'] position of the scored prompt token
    token_ids: np.ndarray       # int64[P'] the prompt token there
    logprobs: np.ndarray        # f32[P'] its logprob
    ranks: np.ndarray           # int64[P'] its rank (1 = most likely)
    top_ids: np.ndarray         # int64[P', K]
    top_logprobs: np.ndarray    # f32[P', K]


@dataclass(slots=True)
class ModelRunnerOutput:
    """S sampling rows, each with a variable number of tokens (CSR): one without speculation, the
    accepted proposals plus one with it. Logprob arrays are aligned with ``token_ids``."""

    req_ids: np.ndarray                                   # int64[S] batch order
    token_offsets: np.ndarray                             # int32[S+1]
    token_ids: np.ndarray                                 # int32[*]
    token_logprobs: np.ndarray | None = None              # f32[*] (None: no row asked)
    token_ranks: np.ndarray | None = None                 # int64[*]
    top_ids: np.ndarray | None = None                     # int64[*, K] K = most logprobs asked this step
    top_logprobs: np.ndarray | None = None                # f32[*, K]
    logprob_rows: np.ndarray | None = None                # bool[S] rows that asked for logprobs
    prompt_logprobs: dict[int, PromptLogprobs] = field(default_factory=dict)   # req id -> its scores
    draft_offsets: np.ndarray | None = None               # int32[S+1] proposals for the next step
    draft_token_ids: np.ndarray | None = None             # int32[*]

    @classmethod
    def empty(cls) -> "ModelRunnerOutput":
        return cls(_empty(np.int64), _zeros_offsets(), _empty(np.int32))

    @classmethod
    def one_token_each(cls, req_ids: np.ndarray, tokens: np.ndarray) -> "ModelRunnerOutput":
        """The common case: one sampled token per row."""
        return cls(np.asarray(req_ids, np.int64), np.arange(len(req_ids) + 1, dtype=np.int32),
                   np.asarray(tokens, np.int32))

    @property
    def num_rows(self) -> int:
        return int(self.req_ids.shape[0])

    def tokens(self, i: int) -> np.ndarray:
        return self.token_ids[self.token_offsets[i]:self.token_offsets[i + 1]]
