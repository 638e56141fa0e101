# SPDX-License-Identifier: Apache-2.0
"""Incremental detokenization and stop strings of one sample.

Text is produced the way vLLM's ``detokenize_incrementally`` does: decode a short window of ids
that ends at the newest token and compare it with the same window without the new tokens. A
window whose text ends in U+FFFD (an incomplete multi-byte UTF-8 character or byte-fallback run)
is held back until later tokens complete it, so no replacement character ever reaches the output
unless the model really produced invalid bytes and finished.

Stop strings are searched in the text added by this step plus the ``len(stop) - 1`` characters
before it, so a stop string split across tokens is found. The stop string is cut from the output
unless ``include_stop_str_in_output``; while a request runs, the last ``max_stop_len - 1``
characters are held back so that text later cut off is never shown to a streaming client.

Must not import torch, the scheduler or the executor.
"""
from __future__ import annotations

from typing import Protocol, Sequence

__all__ = ["TokenDecoder", "IncrementalDetokenizer"]

# How many already-emitted tokens the decode window keeps for context (leading spaces, merges).
_PREFIX_WINDOW = 6


class TokenDecoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns one sample's token ids into text step by step and finds its stop strings.

    ``prompt_token_ids`` give the decoder the context of the first output tokens.
    """

    def __init__(self, tokenizer: TokenDecoder, prompt_token_ids: Sequence[int], *,
                 skip_special_tokens: bool = True, stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False, min_tokens: int = 0) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stop = list(stop)
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        # The ids the windows index into: a short tail of the prompt, then every output token.
        tail = list(prompt_token_ids[-_PREFIX_WINDOW:])
        self._ids: list[int] = tail
        self._prefix_offset = 0
        self._read_offset = len(tail)
        self._num_output = 0
        self.text = ""            # every character decoded so far (after a stop-string cut)
        self.stop_reason: str | None = None

    # ------------------------------------------------------------------------------------
    def update(self, new_token_ids: Sequence[int], *, skip_last: bool = False) -> str | None:
        """Appends new output tokens and decodes them. ``skip_last``: the last token ended the
        sample (EOS or a stop token id) and its text is not part of the output.

        Returns the stop string that matched (the sample must then finish), else None.
        """
        ids = list(new_token_ids)
        if skip_last and ids:
            ids = ids[:-1]
            self._num_output += 1
        before = len(self.text)
        for tid in ids:
            self._ids.append(int(tid))
            self._num_output += 1
            self.text += self._decode_next()
        if self._stop and self.stop_reason is None and self._num_output >= self._min_tokens:
            return self._check_stop(before)
        return None

    def finish(self) -> None:
        """The sample ended: flush text still held back by an incomplete UTF-8 sequence."""
        if self._read_offset < len(self._ids) and self.stop_reason is None:
            prefix = self._tok.decode(self._ids[self._prefix_offset:self._read_offset], self._skip)
            full = self._tok.decode(self._ids[self._prefix_offset:], self._skip)
            if len(full) > len(prefix):
                self.text += full[len(prefix):]
            self._prefix_offset = self._read_offset = len(self._ids)

    def visible_text(self, finished: bool) -> str:
        """The text a client may see now: all of it once finished, else without the tail that a
        stop string might still cut off."""
        if finished or self._max_stop_len <= 1 or self.stop_reason is not None:
            return self.text
        hold = self._max_stop_len - 1
        return self.text[:max(len(self.text) - hold, 0)]

    # ------------------------------------------------------------------------------------
    def _decode_next(self) -> str:
        prefix = self._tok.decode(self._ids[self._prefix_offset:self._read_offset], self._skip)
        full = self._tok.decode(self._ids[self._prefix_offset:], self._skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""

    def _check_stop(self, before: int) -> str | None:
        start = max(before - self._max_stop_len + 1, 0)
        best: tuple[int, str] | None = None
        for s in self._stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[:i + len(s)] if self._include_stop else self.text[:i]
        self.stop_reason = s
        return s
