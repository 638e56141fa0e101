# SPDX-License-Identifier: Apache-2.0
"""Tokenizer: a Hugging Face directory (tokenizer.json + tokenizer_config.json +
generation_config.json) and a SentencePiece-type GGUF vocabulary, each checked against
transformers' tokenizer on the same files; special tokens, EOS sets, byte handling, bad ids."""
from __future__ import annotations

import json
import os

import pytest
import transformers
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, trainers

from mindie_llm.tokenizer import Tokenizer, TokenizerError

CORPUS = ["Hello world, this is a test.", "Héllo wörld! 你好，世界。", "Привет мир", "🤖 robots 🎉",
          "the quick brown fox jumps over the lazy dog"] * 20
TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<eot>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}, "chat_template": TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2], "bos_token_id": 0}))
    return str(d)


TEXTS = ["Hello world", "Héllo wörld! 你好，世界。 Привет 🤖", "a</s>b <eot> c", "  spaces\n\nand\ttabs  ", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_hf_dir_encode_decode_match_transformers(hf_dir, text):
    ours = Tokenizer.from_hf_dir(hf_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)
    assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    # raw bytes of the tokens reassemble the text (special tokens as their text)
    assert b"".join(ours.token_bytes(i) for i in ids).decode("utf-8") == text


def test_hf_dir_special_tokens_eos_set_and_chat_template(hf_dir):
    ours = Tokenizer.from_hf_dir(hf_dir)
    assert ours.bos_token_id == 0 and ours.eos_token_id == 1
    assert ours.eos_token_ids == (1, 2)  # tokenizer_config eos first, generation_config's list merged
    assert {0, 1, 2} <= set(ours.all_special_ids)
    assert ours.vocab_size == len(transformers.AutoTokenizer.from_pretrained(hf_dir))
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(msgs) == "<s>[user] hi</s>[assistant] "
    assert ours.apply_chat_template(msgs, add_generation_prompt=False) == "<s>[user] hi</s>"


def test_multibyte_character_split_across_tokens_has_partial_bytes(hf_dir):
    ours = Tokenizer.from_hf_dir(hf_dir)
    ids = ours.encode("𝔘")  # 4 UTF-8 bytes, not in the training corpus: split into byte tokens
    parts = [ours.token_bytes(i) for i in ids]
    assert len(parts) > 1 and b"".join(parts) == "𝔘".encode("utf-8")


def test_bad_ids_and_inputs_are_value_errors(hf_dir):
    ours = Tokenizer.from_hf_dir(hf_dir)
    with pytest.raises(TokenizerError, match="token_ids"):
        ours.decode([5, 400])
    with pytest.raises(TokenizerError, match="token_ids"):
        ours.decode([-1])
    with pytest.raises(TokenizerError, match="prompt"):
        ours.encode(123)
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(os.path.dirname(hf_dir))
    assert issubclass(TokenizerError, ValueError)


def test_sentencepiece_gguf_vocabulary_matches_transformers(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    # a SentencePiece-BPE vocabulary: control tokens, 256 byte-fallback tokens, pieces with scores
    pieces = ["▁", "▁t", "he", "▁the", "▁a", "ll", "▁w", "or", "ld", "▁wor", "▁world", "h", "e", "t", "a",
              "l", "w", "o", "r", "d", "i", "s", "▁is", "▁h", "▁he", "ello", "el", "lo", "▁hello"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    path = str(tmp_path / "sp.gguf")
    w = gguf.GGUFWriter(path, "llama")
    for k, v in dict(context_length=64, embedding_length=32, block_count=1, feed_forward_length=32,
                     head_count=2).items():
        getattr(w, f"add_{k}")(v)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from mindie_llm.loader.gguf_loader import read_gguf_metadata

    ours = Tokenizer.from_gguf_fields(read_gguf_metadata(path), name=path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    for text in ["hello world", "the world is hello", "héllo 世"]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ids[0] == 1  # add_bos_token from the metadata
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
