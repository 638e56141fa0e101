# SPDX-License-Identifier: Apache-2.0
"""Model-level accuracy of each quantization scheme on the embedded SmolLM2-135M-Instruct.

Reference: the same model in fp32 (the GGUF dequantized, ``model.quantization=none``). Text: the
package description of the installed ``transformers`` distribution (scripts/quantize.py
``calibration_text()``): W8A8 and the AWQ scale search calibrate on its first 256 tokens, perplexity is measured on the
next 128. Bounds: W8A8 within 3%, KV int8 within 2%, KV fp8 e4m3 within 5% of the fp32 perplexity;
W4A16 (group 32, AWQ layout) with AWQ's activation-aware scale search (scripts/quantize.py
``--awq-search``, on the 256 calibration tokens) within 10% (measured -4.43%: below the fp32 figure,
the scales being searched on the first part of the same text, so partly fit to it; greedy
agreement [2, 0, 15]); plain round-to-nearest W4A16 within 25%: it rounds with a per-group clip
search only, and the
fp32 reference is itself the dequantized Q4_1 file, so 4 bits quantize it a second time (measured
+16.5% here; 576 input channels also rule out group 128). GPTQ's rounding (scripts/quantize.py
``--error-feedback``) with the Hessian of the same 256 calibration tokens measured +19.2% (worse:
256 tokens for inputs of up to 1536 channels), so it does not replace round-to-nearest here.
Measured under load on the 2-core CI-class machine: W8A8 +1.99%, W4A16 +16.50%, KV int8 -0.49%,
KV fp8 -0.35%; greedy agreement (tokens before the first difference, of 32, per prompt): W8A8
[5, 0, 6], W4A16 [4, 2, 5], KV int8 [32, 10, 32], KV fp8 [5, 6, 13]. Greedy agreement over 32 tokens of three
prompts is printed (reported, not asserted).
"""
import math
import os
import sys

import pytest
import torch

from mindie_llm.config import ModelConfig
from mindie_llm.loader import load_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unit", "layers"))
from quant_fixtures import quantize_script, write_quantized_dir  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    q = quantize_script()
    fp = load_model(ModelConfig(quantization="none", dtype="float32"), "cpu", "float32", progress=False)
    ids = fp.tokenizer.encode(q.calibration_text())
    assert len(ids) >= 384
    prompts = [fp.tokenizer.encode(p) for p in PROMPTS]
    greedy = [_greedy(fp, p) for p in prompts]                    # fp32 greedy, once
    evaluation = ids[256:384]
    return (q, fp, ids[:256], evaluation, tmp_path_factory.mktemp("quant"), prompts, greedy,
            _ppl(q, fp, evaluation))


def _ppl(q, loaded, ids, kv=torch.float32):
    logits = loaded.model.compute_logits(q.forward_hidden(loaded.model, loaded.arch, ids, kv_dtype=kv))
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]))
    return math.exp(float(nll))


@torch.inference_mode()
def _greedy(loaded, prompt_ids, n=32, bs=16):
    """Greedy decoding of ``n`` tokens with the KV cache kept across steps (fp32 cache)."""
    from mindie_llm.executor.kv_cache import KVCacheSpec, allocate_kv_caches
    from mindie_llm.ops.attention_metadata import AttentionMetadata

    arch, model = loaded.arch, loaded.model
    nb = -(-(len(prompt_ids) + n) // bs)
    table = [list(range(1, nb + 1))]
    caches = allocate_kv_caches(KVCacheSpec(arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim, bs,
                                            torch.float32), nb + 1, "cpu")
    p = len(prompt_ids)
    h = model(torch.tensor(prompt_ids), torch.arange(p), caches, AttentionMetadata.build([0], [p], table, bs))[-1:]
    out = []
    for i in range(n):
        out.append(int(model.compute_logits(h).argmax()))
        h = model(torch.tensor(out[-1:]), torch.tensor([p + i]), caches,
                  AttentionMetadata.build([p + i], [1], table, bs))
    return out


@torch.inference_mode()
def _agreement(q, loaded, prompt_ids, want, kv):
    """Greedy tokens equal to ``want`` before the first difference: the model's argmax at each
    position of prompt + want (one forward; identical to greedy decoding up to the first miss)."""
    ids = list(prompt_ids) + list(want)
    hidden = q.forward_hidden(loaded.model, loaded.arch, ids, kv_dtype=kv)[len(prompt_ids) - 1:-1]
    got = loaded.model.compute_logits(hidden).argmax(-1).tolist()
    return next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), len(want))


CASES = {"w8a8": ("w8a8", {}, torch.float32, 0.03), "w4a16-awq-g32": ("awq", {"group_size": 32}, torch.float32, 0.25),
         "w4a16-awq-g32-search": ("awq", {"group_size": 32, "awq_search": True}, torch.float32, 0.10),
         "kv-int8": (None, {}, torch.int8, 0.02), "kv-fp8": (None, {}, torch.float8_e4m3fn, 0.05)}


@pytest.mark.parametrize("case", list(CASES))
def test_perplexity_close_to_fp32(setup, case):
    q, fp, calib, evaluation, tmp, prompts, greedy, base = setup
    scheme, kw, kv, bound = CASES[case]
    loaded = fp
    if scheme is not None:
        calibrated = scheme == "w8a8" or kw.get("awq_search")
        path = write_quantized_dir(str(tmp / case), fp, scheme, calib_ids=calib if calibrated else None, **kw)
        loaded = load_model(ModelConfig(path=path), "cpu", "float32", progress=False)
    got = _ppl(q, loaded, evaluation, kv)
    agree = [_agreement(q, loaded, p, g, kv) for p, g in zip(prompts, greedy)]
    print(f"\n{case}: perplexity fp32 {base:.3f} -> {got:.3f} ({100 * (got / base - 1):+.2f}%), "
          f"greedy tokens agreeing before the first difference (of 32): {agree}")
    assert got <= base * (1 + bound), (case, base, got)
