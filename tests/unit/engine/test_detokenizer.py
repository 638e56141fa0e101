# SPDX-License-Identifier: Apache-2.0
"""Incremental detokenization and stop strings. Oracle: the tokenizer's one-shot decode of all
ids (transformers' SmolLM2 tokenizer from the GGUF), and Python's str.find for stop strings."""
import pytest

from mindie_llm.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Привет, 世界! 🤖 café — naïve façade; 日本語のテキスト。",
    "Emoji run: 👩‍👩‍👧‍👦🏳️‍🌈 and math ∑∫√ and Korean 한국어 and Arabic مرحبا",
    "plain ascii, with   spaces\nand newlines\t tabs",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_equals_one_shot(hf_tokenizer, text, chunk):
    prompt = hf_tokenizer.encode("Say:")
    ids = hf_tokenizer.encode(text)
    d = IncrementalDetokenizer(hf_tokenizer, prompt)
    seen = []
    for i in range(0, len(ids), chunk):
        d.update(ids[i:i + chunk])
        seen.append(d.text)
        assert "\ufffd" not in d.text
        assert text.startswith(d.text)      # never emits text it later changes
    d.finish()
    assert d.text == hf_tokenizer.decode(ids)
    assert seen == sorted(seen, key=len)


def test_stop_string_across_token_boundary(hf_tokenizer):
    text = "The answer is forty-two. END of story"
    ids = hf_tokenizer.encode(text)
    for stop, include in (("forty-two", False), ("y-tw", True), ("END of", False)):
        d = IncrementalDetokenizer(hf_tokenizer, [], stop=[stop, "zzz"], include_stop_str_in_output=include)
        hit = None
        for t in ids:
            hit = d.update([t])
            if hit:
                break
        assert hit == stop and d.stop_reason == stop
        i = text.find(stop)
        assert d.text == (text[:i + len(stop)] if include else text[:i])


def test_stop_string_ignored_before_min_tokens(hf_tokenizer):
    ids = hf_tokenizer.encode("a b a b a b")
    d = IncrementalDetokenizer(hf_tokenizer, [], stop=["a"], min_tokens=3)
    hits = [d.update([t]) for t in ids]
    assert hits[:2] == [None, None] and "a" in hits


def test_skip_last_drops_stop_token_text(hf_tokenizer):
    ids = hf_tokenizer.encode("hello world")
    d = IncrementalDetokenizer(hf_tokenizer, [])
    d.update(ids, skip_last=True)
    d.finish()
    assert d.text == hf_tokenizer.decode(ids[:-1])


def test_visible_text_holds_back_possible_stop_prefix(hf_tokenizer):
    ids = hf_tokenizer.encode("abc ###")
    d = IncrementalDetokenizer(hf_tokenizer, [], stop=["####"])
    d.update(ids)
    assert d.visible_text(finished=False) == d.text[:len(d.text) - 3]
    assert d.visible_text(finished=True) == d.text
