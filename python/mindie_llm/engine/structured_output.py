# SPDX-License-Identifier: Apache-2.0
"""Structured output: guided-decoding specs -> grammars -> one matcher per sample -> the packed
token bitmask of the constrained rows of each step.

Owns the spec format of ``SamplingParams.guided_decoding`` (exactly one of ``json`` (a JSON
Schema, dict or string), ``json_object`` (true), ``regex``, ``choice`` (list of strings),
``grammar`` (Lark, or GBNF/EBNF with ``::=``)), compiling and validating it (a bad spec raises
GuidedDecodingError naming the spec key, before the request is admitted), a small cache of
compiled grammars, and the per-process llguidance tokenizer (built once, about a second; safe to
build from any thread). The engine fills ``SchedulerOutput.grammar_bitmask`` from
:meth:`fill_bitmask` and advances each sample's matcher with :meth:`Matcher.accept`.

Grammar engine: llguidance (no dependencies beyond its Rust wheel; docs/architecture.md says why).
Imported lazily: without it, guided decoding is refused with one line. Must not import torch, the
server, the executor or the scheduler.
"""
from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

__all__ = ["GUIDED_KEYS", "GuidedDecodingError", "Matcher", "StructuredOutputManager", "check_spec"]

GUIDED_KEYS = ("json", "json_object", "regex", "choice", "grammar")
_CACHE_SIZE = 64


class GuidedDecodingError(ValueError):
    """A guided-decoding spec is malformed or cannot be compiled; ``field`` is the spec key."""

    def __init__(self, key: str, message: str) -> None:
        self.field = f"guided_decoding.{key}"
        self.key = key
        super().__init__(f"{self.field}: {message}")


def check_spec(spec: Any) -> tuple[str, Any]:
    """(key, value) of a guided-decoding spec; GuidedDecodingError when it is not exactly one known key."""
    if not isinstance(spec, dict):
        raise GuidedDecodingError("spec", f"must be a dict with one of {', '.join(GUIDED_KEYS)}")
    keys = [k for k in spec if spec[k] is not None]
    unknown = [k for k in keys if k not in GUIDED_KEYS]
    if unknown:
        raise GuidedDecodingError(str(unknown[0])[:64], f"unknown; expected one of {', '.join(GUIDED_KEYS)}")
    if len(keys) != 1:
        raise GuidedDecodingError("spec", f"give exactly one of {', '.join(GUIDED_KEYS)}; got {keys}")
    key = keys[0]
    value = spec[key]
    if key == "json" and not isinstance(value, (dict, str)):
        raise GuidedDecodingError(key, "must be a JSON Schema (an object or its JSON text)")
    if key == "json_object" and value is not True:
        raise GuidedDecodingError(key, "must be true")
    if key in ("regex", "grammar") and (not isinstance(value, str) or not value):
        raise GuidedDecodingError(key, "must be a non-empty string")
    if key == "choice" and (not isinstance(value, list) or not value or
                            not all(isinstance(c, str) and c for c in value)):
        raise GuidedDecodingError(key, "must be a non-empty list of non-empty strings")
    return key, value


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise GuidedDecodingError("spec", "structured output needs the llguidance package "
                                  "(pip install llguidance)") from None
    return llguidance


def _grammar_text(llg: Any, key: str, value: Any) -> str:
    M = llg.LLMatcher
    try:
        if key == "json":
            return M.grammar_from_json_schema(value if isinstance(value, str) else json.dumps(value))
        if key == "json_object":
            return M.grammar_from_json_schema({"type": "object"})
        if key == "regex":
            return M.grammar_from_regex(value)
        if key == "choice":
            alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in value)
            return M.grammar_from_lark(f"start: {alts}\n")
        if "::=" in value:   # GBNF / EBNF (llama.cpp, xgrammar) -> Lark
            from llguidance.gbnf_to_lark import gbnf_to_lark

            value = gbnf_to_lark(value)
        return M.grammar_from_lark(value)
    except (ValueError, TypeError, RuntimeError) as e:
        raise GuidedDecodingError(key, f"cannot be compiled: {str(e).splitlines()[0][:200]}") from None


class Matcher:
    """The grammar state of one sample: which tokens may come next, advanced token by token."""

    def __init__(self, inner: Any, words: int) -> None:
        self._m = inner
        self.words = words
        self.error: str | None = None

    def fill(self, row: np.ndarray) -> bool:
        """Writes the allowed-token mask into ``row`` (int32[W]); False when no token is allowed
        (the row is then left all-allowed and the next :meth:`accept` fails)."""
        import llguidance.numpy as lln  # noqa: F401 - same layout; the pointer call below is its fill

        self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.size * row.itemsize)
        if self._m.is_error() or not row.any():
            row.fill(-1)
            self.error = self.error or (self._m.get_error().splitlines()[0][:200] if self._m.is_error()
                                        else "no token can continue the grammar")
            return False
        return True

    def accept(self, token: int) -> bool:
        """Advances past ``token``; False (and ``error`` set) when the grammar does not allow it."""
        if self.error is None and not self._m.consume_token(int(token)):
            self.error = (self._m.get_error().splitlines()[0][:200] if self._m.is_error()
                          else f"token {token} does not continue the grammar")
        return self.error is None

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (EOS aside)."""
        return self.error is None and self._m.is_stopped()


class StructuredOutputManager:
    """Compiles specs for one tokenizer and makes matchers. Thread-safe: the server compiles
    (validates) specs off the event loop, the engine thread makes matchers from the cache."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.words = -(-self.vocab_size // 32)
        self._eos = [int(e) for e in eos_token_ids]
        self._lock = threading.Lock()
        self._lltok: Any = None
        self._cache: OrderedDict[str, str] = OrderedDict()

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._lltok is None:
                llg = _llguidance()
                backend = getattr(self._tokenizer, "backend", None)
                if backend is None:
                    raise GuidedDecodingError("spec", "the model has no tokenizer; structured output needs one")
                self._lltok = llg.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size,
                                              eos_token=self._eos or None)
            return self._lltok

    def compile(self, spec: Any) -> str:
        """The grammar of ``spec`` (cached); GuidedDecodingError when it is invalid or unsatisfiable."""
        key, value = check_spec(spec)
        cache_key = json.dumps([key, value], sort_keys=True, ensure_ascii=False)
        with self._lock:
            hit = self._cache.get(cache_key)
            if hit is not None:
                self._cache.move_to_end(cache_key)
                return hit
        llg = _llguidance()
        text = _grammar_text(llg, key, value)
        m = llg.LLMatcher(self._ll_tokenizer(), text, log_level=0)
        if m.is_error():
            raise GuidedDecodingError(key, f"cannot be matched: {m.get_error().splitlines()[0][:200]}")
        with self._lock:
            self._cache[cache_key] = text
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return text

    def new_matcher(self, spec: Any) -> Matcher:
        llg = _llguidance()
        return Matcher(llg.LLMatcher(self._ll_tokenizer(), self.compile(spec), log_level=0), self.words)

    def fill_bitmask(self, matchers: list[Matcher]) -> np.ndarray:
        """int32[G, W]: row g is the allowed-token mask of ``matchers[g]`` (all-allowed when its
        grammar has nowhere to go; the sample is then finished after the step)."""
        out = np.empty((len(matchers), self.words), np.int32)
        for g, m in enumerate(matchers):
            m.fill(out[g])
        return out


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when llguidance can be imported."""
    try:
        _llguidance()
    except GuidedDecodingError:
        return False
    return True
