# SPDX-License-Identifier: Apache-2.0
"""Structured output on the embedded model (SmolLM2-135M-Instruct on the CPU), end to end through
the engine, the step message's grammar bitmask and the sampler.

Oracles: every output parses and satisfies its schema (hand-written predicates, one per schema),
greedy and sampled; an unconstrained greedy request gives the same tokens alone and in a batch with
constrained requests (batch invariance); an unsatisfiable schema is refused naming the field.
"""
from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("llguidance")

from mindie_llm import LLM, SamplingParams  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

OBJ = {"type": "object", "properties": {"color": {"enum": ["red", "green"]},
                                        "n": {"type": "integer", "minimum": 0, "maximum": 9}},
       "required": ["color", "n"], "additionalProperties": False}
ARR = {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3}
NESTED = {"type": "object", "properties": {"p": {"type": "object", "properties": {"x": {"type": "boolean"}},
                                                 "required": ["x"], "additionalProperties": False}},
          "required": ["p"], "additionalProperties": False}
ANYOF = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"enum": ["none"]}]}
PATTERN = {"type": "string", "pattern": "^[a-z]{2,5}$"}
ENUM = {"enum": ["yes", "no"]}

SUITE = [
    (OBJ, lambda v: isinstance(v, dict) and set(v) == {"color", "n"} and v["color"] in ("red", "green")
     and isinstance(v["n"], int) and 0 <= v["n"] <= 9),
    (ARR, lambda v: isinstance(v, list) and 1 <= len(v) <= 3 and all(x in ("a", "b") for x in v)),
    (NESTED, lambda v: isinstance(v, dict) and set(v) == {"p"} and set(v["p"]) == {"x"}
     and isinstance(v["p"]["x"], bool)),
    (ANYOF, lambda v: v == "none" or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 99)),
    (PATTERN, lambda v: isinstance(v, str) and re.fullmatch(r"[a-z]{2,5}", v) is not None),
    (ENUM, lambda v: v in ("yes", "no")),
]
PROMPT = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=512, num_blocks=512, device="cpu")


def test_schema_suite_is_valid_greedy_and_sampled(llm):
    params = [SamplingParams(max_tokens=48, temperature=t, seed=7, guided_decoding={"json": schema})
              for schema, _ in SUITE for t in (0.0, 1.0)]
    outs = llm.chat([PROMPT] * len(params), params, use_tqdm=False)
    bad = []
    for (schema, ok), pair in zip(SUITE, zip(outs[0::2], outs[1::2])):
        for o in pair:
            c = o.outputs[0]
            try:
                value = json.loads(c.text)
            except ValueError:
                value = ValueError
            if value is ValueError or not ok(value) or c.finish_reason != "stop":
                bad.append((json.dumps(schema)[:60], c.text, c.finish_reason))
    assert not bad, bad


def test_regex_and_choice_complete_with_stop(llm):
    outs = llm.generate(["The answer is", "Pick one:"],
                        [SamplingParams(max_tokens=12, temperature=0, guided_decoding={"regex": "[0-9]{3}"}),
                         SamplingParams(max_tokens=12, temperature=1.0, seed=3,
                                        guided_decoding={"choice": ["alpha", "beta"]})], use_tqdm=False)
    assert re.fullmatch(r"[0-9]{3}", outs[0].outputs[0].text) and outs[0].outputs[0].finish_reason == "stop"
    assert outs[1].outputs[0].text in ("alpha", "beta") and outs[1].outputs[0].finish_reason == "stop"


def test_constrained_requests_leave_the_rest_of_the_batch_unchanged(llm):
    free = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)] * 2
    prompts = ["The capital of France is", "def fibonacci(n):"]
    alone = llm.generate(prompts, free, use_tqdm=False)
    mixed = llm.generate(prompts + ["Give JSON:", "A number:"],
                         free + [SamplingParams(max_tokens=16, temperature=0, guided_decoding={"json": OBJ}),
                                 SamplingParams(max_tokens=16, temperature=0.7, seed=1,
                                                guided_decoding={"regex": "[0-9]+"})], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in alone] == [o.outputs[0].token_ids for o in mixed[:2]]
    assert json.loads(mixed[2].outputs[0].text)["color"] in ("red", "green")


def test_unsatisfiable_schema_is_refused_naming_the_field(llm):
    impossible = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}},
                  "required": ["a"]}
    with pytest.raises(ValueError, match="guided_decoding.json"):
        llm.generate(["x"], SamplingParams(max_tokens=4, guided_decoding={"json": impossible}), use_tqdm=False)
