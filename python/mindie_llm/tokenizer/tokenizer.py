# SPDX-License-Identifier: Apache-2.0
"""``Tokenizer``: text <-> token ids over the ``tokenizers`` library, built from a Hugging Face
directory (tokenizer.json + tokenizer_config.json + generation_config.json) or from the vocabulary
and merges stored in a GGUF file. Knows the special tokens, the EOS set and the chat template;
``token_bytes`` gives the raw bytes of a token (byte-level BPE and SentencePiece byte fallback) for
incremental detokenization.

Must not import torch, models, ops or the engine. The chat template renders through
``tokenizer.chat_template`` (imported lazily).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers

__all__ = ["Tokenizer", "TokenizerError", "bytes_to_unicode"]


class TokenizerError(ValueError):
    """A tokenizer file is missing or malformed, or token ids are outside the vocabulary."""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _token_str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """Wraps a ``tokenizers.Tokenizer`` plus the model's special-token and chat-template metadata."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None = None,
                 eos_token_ids: Sequence[int] = (), pad_token_id: int | None = None,
                 chat_template: str | None = None, add_bos_token: bool = False,
                 byte_level: bool | None = None, name: str = "tokenizer"):
        self._tok = backend
        self.name = name
        self.bos_token_id = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(e) for e in eos_token_ids))
        self.eos_token_id: int | None = self.eos_token_ids[0] if self.eos_token_ids else None
        self.pad_token_id = pad_token_id if pad_token_id is not None else self.eos_token_id
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        decoder = backend.decoder
        self.byte_level = (isinstance(decoder, decoders.ByteLevel) if byte_level is None else byte_level)
        specials = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        specials.update(e for e in (bos_token_id, pad_token_id, *self.eos_token_ids) if e is not None)
        self.all_special_ids: list[int] = sorted(specials)
        self._token_bytes_cache: dict[int, bytes] = {}
        # Strings the backend turns into added tokens wherever they appear in a text.
        self._added_strings = tuple(t.content for t in backend.get_added_tokens_decoder().values() if t.content)
        self._text_backend: tokenizers.Tokenizer | None = None   # same vocabulary, added tokens as text

    # ------------------------------------------------------------------ properties
    @property
    def bos_token(self) -> str | None:
        return self._tok.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self._tok.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"prompt: expected a string, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None and \
                (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def encode_as_text(self, text: str) -> list[int]:
        """Token ids of ``text`` with control strings (``<|im_end|>``...) split into ordinary tokens:
        no special token can come out of it. No BOS."""
        if not isinstance(text, str):
            raise TokenizerError(f"prompt: expected a string, got {type(text).__name__}")
        if self._text_backend is None:
            backend = tokenizers.Tokenizer.from_str(self._tok.to_str())
            backend.encode_special_tokens = True
            self._text_backend = backend
        return self._text_backend.encode(text, add_special_tokens=False).ids

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        out = [int(i) for i in ids]
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token_ids: {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._tok.id_to_token(i) for i in self._check_ids(ids)]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token ``token_id`` stands for (special tokens: their UTF-8 text).
        Concatenating these over a sequence and decoding as UTF-8 gives the text."""
        cached = self._token_bytes_cache.get(token_id)
        if cached is not None:
            return cached
        tok = self._tok.id_to_token(int(token_id))
        if tok is None:
            raise TokenizerError(f"token_ids: {token_id} outside the vocabulary [0, {self.vocab_size})")
        if int(token_id) in self.all_special_ids:
            out = tok.encode("utf-8")
        elif self.byte_level:
            table = _unicode_to_bytes()
            out = bytes(table[c] for c in tok) if all(c in table for c in tok) else tok.encode("utf-8")
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            out = bytes([int(tok[3:5], 16)])  # SentencePiece byte fallback
        else:
            out = tok.replace("\u2581", " ").encode("utf-8")
        self._token_bytes_cache[token_id] = out
        return out

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        from mindie_llm.tokenizer.chat_template import render  # lazy: jinja only when chatting

        kwargs.setdefault("bos_token", self.bos_token or "")
        kwargs.setdefault("eos_token", self.eos_token or "")
        return render(self.chat_template, messages, add_generation_prompt, **kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, *,
                    content_special_tokens: bool = False, **kwargs: Any) -> list[int]:
        """The prompt ids of a conversation. Message content is tokenized as text, so control
        strings inside it cannot forge turns; only the template's text yields special tokens.
        ``content_special_tokens`` restores parsing them inside content (trusted deployments)."""
        from mindie_llm.tokenizer.chat_template import render_segments

        kwargs.setdefault("bos_token", self.bos_token or "")
        kwargs.setdefault("eos_token", self.eos_token or "")
        if content_special_tokens:
            return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))
        pieces = render_segments(self.chat_template, messages, add_generation_prompt,
                                 protect=self._added_strings, **kwargs)
        if len(pieces) == 1 and not pieces[0][1]:
            return self.encode(pieces[0][0])
        ids = list(self._tok.encode("", add_special_tokens=True).ids)   # the post-processor's prefix (BOS)
        for text, is_content in pieces:
            ids.extend(self.encode_as_text(text) if is_content else
                       self._tok.encode(text, add_special_tokens=False).ids)
        if self.add_bos_token and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf_dir(cls, path: str, extra_eos_token_ids: Sequence[int] = ()) -> "Tokenizer":
        """From a directory with tokenizer.json (required), tokenizer_config.json,
        chat_template.jinja / chat_template.json and generation_config.json (all optional)."""
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise TokenizerError(f"{tok_file}: missing (only fast tokenizers, tokenizer.json, are supported)")
        try:
            backend = tokenizers.Tokenizer.from_file(tok_file)
        except Exception as e:  # tokenizers raises its own Exception type
            raise TokenizerError(f"{tok_file}: cannot be parsed: {e}") from None
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        gen = _read_json(os.path.join(path, "generation_config.json"))
        model_cfg = _read_json(os.path.join(path, "config.json"))

        def tok_id(key: str) -> int | None:
            s = _token_str(cfg.get(key))
            return backend.token_to_id(s) if s is not None else None

        eos: list[int] = []
        e = tok_id("eos_token")
        if e is not None:
            eos.append(e)
        for source in (gen, model_cfg):
            v = source.get("eos_token_id")
            eos.extend(v if isinstance(v, list) else ([] if v is None else [v]))
        eos.extend(extra_eos_token_ids)
        bos = tok_id("bos_token")
        if bos is None:
            bos = gen.get("bos_token_id", model_cfg.get("bos_token_id"))
        return cls(backend, bos_token_id=bos, eos_token_ids=[int(x) for x in eos],
                   pad_token_id=tok_id("pad_token"), chat_template=_hf_chat_template(path, cfg),
                   add_bos_token=False, name=path)

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any], name: str = "gguf") -> "Tokenizer":
        """From parsed GGUF metadata (``tokenizer.ggml.*`` and ``tokenizer.chat_template``)."""
        kind = fields.get("tokenizer.ggml.model")
        tokens = fields.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError(f"{name}: tokenizer.ggml.tokens missing")
        types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            backend = _gguf_byte_level(tokens, fields.get("tokenizer.ggml.merges") or [], types,
                                       fields.get("tokenizer.ggml.pre"))
        elif kind == "llama":
            backend = _gguf_sentencepiece(tokens, fields.get("tokenizer.ggml.scores") or [], types,
                                          fields.get("tokenizer.ggml.merges"),
                                          fields.get("tokenizer.ggml.unknown_token_id"),
                                          bool(fields.get("tokenizer.ggml.add_space_prefix", True)))
        else:
            raise TokenizerError(f"{name}: tokenizer.ggml.model {kind!r} is not supported (gpt2, llama)")
        eos = [fields["tokenizer.ggml.eos_token_id"]] if "tokenizer.ggml.eos_token_id" in fields else []
        eot = fields.get("tokenizer.ggml.eot_token_id")
        if eot is not None:
            eos.append(eot)
        add_bos = fields.get("tokenizer.ggml.add_bos_token", kind == "llama")
        return cls(backend, bos_token_id=fields.get("tokenizer.ggml.bos_token_id"), eos_token_ids=eos,
                   pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
                   chat_template=fields.get("tokenizer.chat_template"), add_bos_token=bool(add_bos),
                   byte_level=(kind == "gpt2"), name=name)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _hf_chat_template(path: str, cfg: Mapping[str, Any]) -> str | None:
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    tpl = cfg.get("chat_template") or _read_json(os.path.join(path, "chat_template.json")).get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, Mapping)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) else None


def _special_tokens(tokens: Sequence[str], types: Sequence[int], alphabet: set[str] | None
                    ) -> tuple[list[AddedToken], list[AddedToken]]:
    control, user = [], []
    for tok, typ in zip(tokens, types):
        if typ == 3 and (alphabet is None or set(tok) <= alphabet):       # CONTROL
            control.append(AddedToken(tok, normalized=False, special=True))
        elif typ == 4:                                                     # USER_DEFINED
            user.append(AddedToken(tok, normalized=False, special=False))
    return control, user


def _gguf_byte_level(tokens: Sequence[str], merges: Sequence[str], types: Sequence[int],
                     pre: str | None) -> tokenizers.Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        key = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(key, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    split = _PRE_SPLITS.get(pre or "")
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    control, user = _special_tokens(tokens, types, alphabet)
    backend.add_special_tokens(control)
    backend.add_tokens([t for t in user if t.content in vocab])
    return backend


def _gguf_sentencepiece(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int],
                        merges: Sequence[str] | None, unk_id: int | None,
                        add_space_prefix: bool) -> tokenizers.Tokenizer:
    """SentencePiece-BPE (llama-type GGUF): BPE with byte fallback; merges from the file or derived
    from the scores (a merge a+b ranks by the score of the merged piece)."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        ranked = []
        for tok, idx in vocab.items():
            for cut in range(1, len(tok)):
                a, b = tok[:cut], tok[cut:]
                if a in vocab and b in vocab:
                    score = scores[idx] if idx < len(scores) else 0.0
                    ranked.append((-score, vocab[a], vocab[b], a, b))
        ranked.sort()
        pairs = [(a, b) for _, _, _, a, b in ranked]
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=unk,
                                              fuse_unk=True, byte_fallback=True))
    norm = [normalizers.Replace(" ", "\u2581")]
    if add_space_prefix:
        norm.insert(0, normalizers.Prepend("\u2581"))
    backend.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(dec)
    control, user = _special_tokens(tokens, types, None)
    backend.add_special_tokens(control)
    backend.add_tokens(user)
    return backend


_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# GGUF tokenizer.ggml.pre -> split regex (others use GPT-2's byte-level regex).
_PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
               "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
               "deepseek-r1-qwen": _QWEN2_SPLIT}
