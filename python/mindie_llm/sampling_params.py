# SPDX-License-Identifier: Apache-2.0
"""SamplingParams: how one request is sampled and when it stops (shaped like vLLM's).

Owns the validation of every sampling field: a bad value raises ``SamplingParamsError`` (a
``ValueError``) naming the field, before anything is scheduled. Caps that depend on the deployment
(``n`` above ``scheduler.max_n``, prompt length) are checked by the engine.

Must not import torch or anything of the package but the standard library.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["SAMPLING_BOUNDS", "Bound", "SamplingParams", "SamplingParamsError", "MAX_LOGIT_BIAS_ENTRIES"]

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_INT32_MAX = (1 << 31) - 1


@dataclass(frozen=True)
class Bound:
    """The accepted range of one numeric sampling field: ``lo <= v <= hi`` (strict where open)."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, v: float) -> bool:
        if isinstance(v, float) and math.isnan(v):
            return False
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def describe(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else str(x)

        return f"{'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


# The one table of sampling ranges: SamplingParams enforces it, so the HTTP, native gRPC and KServe
# front ends (which all build SamplingParams) accept and refuse the same values. Deployment caps
# (n, max_tokens, logprobs, stop strings) are RequestLimits' (server/protocol_limits.py).
SAMPLING_BOUNDS: dict[str, Bound] = {
    "temperature": Bound(0.0, 100.0),
    "top_p": Bound(0.0, 1.0, lo_open=True),
    "min_p": Bound(0.0, 1.0),
    "presence_penalty": Bound(-2.0, 2.0),
    "frequency_penalty": Bound(-2.0, 2.0),
    "repetition_penalty": Bound(0.0, 10.0, lo_open=True),
    "top_k": Bound(-1, _INT32_MAX),
    "min_tokens": Bound(0, _INT32_MAX),
    "stop_token_ids": Bound(0, _INT32_MAX),      # each id (int32 on the step message)
    "logit_bias": Bound(-100.0, 100.0),          # each bias (OpenAI's range; contract.LOGIT_BIAS_MAX)
    "logit_bias.token_id": Bound(0, _INT32_MAX),  # each key; the vocabulary bound is the engine's
}
MAX_LOGIT_BIAS_ENTRIES = 300                     # entries of one request's logit_bias map (OpenAI's cap)


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range. ``field`` names it."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    """Sampling and stopping of one request.

    ``temperature=0`` is greedy. ``top_k`` 0 or -1 is off. ``logprobs=N`` returns the top-N
    logprobs of the model's raw distribution (log_softmax of the logits, before temperature and
    penalties, as vLLM does) plus the sampled token's. ``prompt_logprobs=N`` scores every prompt
    token from position 1 (position 0 is None); positions whose KV came from the prefix cache are
    not recomputed and are None too. ``stop`` strings are excluded from the text unless
    ``include_stop_str_in_output``. ``seed`` makes a request's draws depend only on (seed, output
    position): the same output whatever else is batched with it, and after preemption.
    ``logit_bias`` maps token ids to a bias in [-100, 100] added to their logits before penalties,
    temperature and filtering (as vLLM); ``logprobs`` stay those of the unbiased distribution.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Structured output: exactly one of {"json": schema, "json_object": True, "regex": str,
    # "choice": [str, ...], "grammar": lark_or_gbnf} (engine/structured_output.py compiles it).
    guided_decoding: dict | None = None
    logit_bias: dict[int, float] | None = None
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_ints()
        self._check_floats()
        self._check_stops()
        self._check_logit_bias()
        if self.guided_decoding is not None and not isinstance(self.guided_decoding, dict):
            raise SamplingParamsError("guided_decoding", "must be a dict such as {'json': schema} or None")

    # ------------------------------------------------------------------------------------
    def _check_ints(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise SamplingParamsError("n", f"must be an integer >= 1; got {self.n!r}")
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise SamplingParamsError("max_tokens", f"must be an integer >= 1; got {self.max_tokens!r}")
        b = SAMPLING_BOUNDS["min_tokens"]
        if not _is_int(self.min_tokens) or not b.contains(self.min_tokens):
            raise SamplingParamsError("min_tokens", f"must be an integer in {b.describe()}; got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise SamplingParamsError("min_tokens", f"must be <= max_tokens ({self.max_tokens}); "
                                      f"got {self.min_tokens}")
        b = SAMPLING_BOUNDS["top_k"]
        if not _is_int(self.top_k) or not b.contains(self.top_k):
            raise SamplingParamsError("top_k", f"must be an integer in {b.describe()} (0 or -1 = off); "
                                      f"got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not _INT64_MIN <= self.seed <= _INT64_MAX):
            raise SamplingParamsError("seed", f"must be an integer in int64 range or None; got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 0):
                raise SamplingParamsError(name, f"must be an integer >= 0 or None; got {v!r}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(name, f"must be true or false; got {getattr(self, name)!r}")

    def _check_floats(self) -> None:
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            v = getattr(self, name)
            b = SAMPLING_BOUNDS[name]
            if not _is_num(v) or not b.contains(v):
                raise SamplingParamsError(name, f"must be a number in {b.describe()}; got {str(v)[:32]}")
            setattr(self, name, float(v))

    def _check_stops(self) -> None:
        stop = self.stop
        if stop is None:
            stops: list[str] = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            stops = list(stop)
        else:
            raise SamplingParamsError("stop", f"must be a string or a list of strings; got {stop!r}")
        if any(s == "" for s in stops):
            raise SamplingParamsError("stop", "stop strings must not be empty")
        self._stop_list = stops
        ids = self.stop_token_ids
        if ids is not None:
            b = SAMPLING_BOUNDS["stop_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and b.contains(i) for i in ids):
                raise SamplingParamsError("stop_token_ids", f"must be a list of integers in {b.describe()}; "
                                          f"got {str(ids)[:128]}")
            self.stop_token_ids = list(ids)

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise SamplingParamsError("logit_bias", f"must be a map of token id to bias or None; got {str(bias)[:64]}")
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise SamplingParamsError("logit_bias", f"at most {MAX_LOGIT_BIAS_ENTRIES} entries; got {len(bias)}")
        kb, vb = SAMPLING_BOUNDS["logit_bias.token_id"], SAMPLING_BOUNDS["logit_bias"]
        out: dict[int, float] = {}
        for k, v in bias.items():
            if not _is_int(k) or not kb.contains(k):
                raise SamplingParamsError("logit_bias", f"key {str(k)[:32]!r} is not a token id in {kb.describe()}")
            if not _is_num(v) or not vb.contains(v):
                raise SamplingParamsError("logit_bias", f"bias of token {k} must be a number in {vb.describe()}; "
                                          f"got {str(v)[:32]}")
            out[int(k)] = float(v)
        self.logit_bias = out or None

    # ------------------------------------------------------------------------------------
    @property
    def stop_strings(self) -> list[str]:
        """``stop`` as a list (possibly empty)."""
        return self._stop_list

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def clone(self) -> "SamplingParams":
        return SamplingParams(**{k: getattr(self, k) for k in self.__dataclass_fields__ if not k.startswith("_")})
