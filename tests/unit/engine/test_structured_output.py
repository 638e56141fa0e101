# SPDX-License-Identifier: Apache-2.0
"""engine/structured_output.py over the embedded model's tokenizer: spec checks name the key, an
unsatisfiable schema is refused at compile time, matchers advance token by token, and a grammar
with nowhere to go is reported (not a hang). Oracle: llguidance's own token validation and the
decoded text of the allowed tokens."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("llguidance")

from mindie_llm.engine.structured_output import GuidedDecodingError, StructuredOutputManager, check_spec  # noqa: E402
from mindie_llm.loader.default_model import default_model_path  # noqa: E402
from mindie_llm.loader.gguf_loader import read_gguf_metadata  # noqa: E402
from mindie_llm.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def mgr():
    tok = Tokenizer.from_gguf_fields(read_gguf_metadata(default_model_path()))
    return StructuredOutputManager(tok, tok.vocab_size, tok.eos_token_ids), tok


@pytest.mark.parametrize("spec,key", [({}, "spec"), ({"json": 5}, "json"), ({"regex": ""}, "regex"),
                                      ({"choice": []}, "choice"), ({"bogus": 1}, "bogus"),
                                      ({"json": {}, "regex": "a"}, "spec"), ({"json_object": False}, "json_object")])
def test_bad_specs_name_the_key(spec, key):
    with pytest.raises(GuidedDecodingError) as e:
        check_spec(spec)
    assert e.value.key == key


def test_unsatisfiable_schema_and_bad_regex_are_refused(mgr):
    m, _ = mgr
    with pytest.raises(GuidedDecodingError, match="json"):
        m.compile({"json": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}},
                            "required": ["a"]}})
    with pytest.raises(GuidedDecodingError, match="regex"):
        m.compile({"regex": "(unclosed"})


def _allowed(row: np.ndarray, vocab: int) -> np.ndarray:
    bits = (row.view(np.uint32)[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    return np.flatnonzero(bits.ravel()[:vocab])


def test_choice_matcher_allows_only_prefixes_and_completes(mgr):
    m, tok = mgr
    mt = m.new_matcher({"choice": ["yes", "no"]})
    row = np.empty(m.words, np.int32)
    assert mt.fill(row)
    texts = {tok.decode([int(t)]) for t in _allowed(row, tok.vocab_size)}
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts), sorted(texts)[:10]
    for t in tok.encode("yes", add_special_tokens=False):
        assert mt.accept(t)
    assert mt.done


def test_a_token_the_grammar_forbids_is_reported(mgr):
    m, tok = mgr
    mt = m.new_matcher({"regex": "[0-9]+"})
    assert not mt.accept(tok.encode("abc", add_special_tokens=False)[0])
    assert mt.error and not mt.done


def test_json_schema_walk_is_accepted(mgr):
    m, tok = mgr
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    mt = m.new_matcher({"json": schema})
    text = json.dumps({"n": 12}, separators=(",", ":"))
    row = np.empty(m.words, np.int32)
    for t in tok.encode(text, add_special_tokens=False):
        mt.fill(row)
        assert t in set(_allowed(row, tok.vocab_size).tolist())
        assert mt.accept(t)
    assert mt.done or mt.fill(row)


def test_the_grammar_bitmask_survives_the_wire_form():
    from mindie_llm.contract import ContractError, SchedulerOutput

    out = SchedulerOutput.empty()
    out.grammar_req_ids = np.array([5, 9], np.int64)
    out.grammar_bitmask = np.arange(2 * 3, dtype=np.int32) - 3
    back = SchedulerOutput.decode(*out.encode())
    assert back.grammar_req_ids.tolist() == [5, 9] and back.grammar_bitmask.tolist() == out.grammar_bitmask.tolist()
    out.grammar_bitmask = np.arange(5, dtype=np.int32)   # not 2 rows of equal width
    with pytest.raises(ContractError, match="grammar_bitmask"):
        SchedulerOutput.decode(*out.encode())
