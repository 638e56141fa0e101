# SPDX-License-Identifier: Apache-2.0
"""Quantized checkpoints end to end on a tiny random Llama: written by scripts/quantize.py (W8A8 with
SmoothQuant, AWQ, GPTQ with and without act-order), detected from config.json, loaded; and
malformed ones refused with an error naming the tensor or field.

Oracle: the float model's logits (quantization error bounds per scheme) and, for the loaded
linears, the ops/reference.py dequantize-then-matmul references (test_quant_linear.py).
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mindie_llm.config import ModelConfig
from mindie_llm.loader import LoaderError, load_model
from quant_fixtures import quantize_script, tiny_float, write_float_dir, write_quantized_dir

IDS = list(range(3, 35))


@pytest.fixture(scope="module")
def fp():
    return tiny_float()


@pytest.fixture(scope="module")
def ref_logits(fp):
    q = quantize_script()
    return fp.model.compute_logits(q.forward_hidden(fp.model, fp.arch, IDS))


def _logits(path, **kw):
    m = load_model(ModelConfig(path=path, **kw), "cpu", "float32", progress=False)
    q = quantize_script()
    return m, m.model.compute_logits(q.forward_hidden(m.model, m.arch, IDS))


# scheme, quantize kwargs, bound on max |logit error| / max |logit| (random weights: 4-bit is coarse)
CASES = [("w8a8", dict(smoothing="norms"), 0.08), ("w8a8", dict(smoothing="factors"), 0.08),
         ("awq", dict(group_size=32), 0.4), ("gptq", dict(group_size=64), 0.5),
         ("gptq", dict(group_size=32, act_order=True), 0.5)]


@pytest.mark.parametrize("scheme,kw,bound", CASES, ids=lambda c: str(c))
def test_quantized_checkpoint_detected_and_close(tmp_path, fp, ref_logits, scheme, kw, bound):
    path = write_quantized_dir(str(tmp_path / scheme), fp, scheme, **kw)
    m, got = _logits(path)
    lin = m.model.model.layers[0].self_attn.qkv_proj
    assert lin.weight is None and lin.linear_method.__name__ in ("w8a8_linear", "w4a16_linear")
    err = float((got - ref_logits).abs().max() / ref_logits.abs().max())
    assert err < bound, err
    if scheme == "gptq" and kw.get("act_order"):
        assert lin.w4_perm is not None


def test_float_checkpoint_quantized_at_load(tmp_path, fp, ref_logits):
    path = write_float_dir(str(tmp_path / "fp"), fp)
    _, same = _logits(path)
    torch.testing.assert_close(same, ref_logits)
    for scheme, bound in (("w8a8", 0.08), ("w4a16", 0.5)):
        _, got = _logits(path, quantization=scheme)
        assert float((got - ref_logits).abs().max() / ref_logits.abs().max()) < bound


def _break(path, fn):
    tensors = load_file(os.path.join(path, "model.safetensors"))
    cfg = json.load(open(os.path.join(path, "config.json")))
    fn(tensors, cfg)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))


def test_malformed_checkpoints_name_the_tensor(tmp_path, fp):
    awq = write_quantized_dir(str(tmp_path / "awq"), fp, "awq", group_size=32)
    # wrong group size: the config says 64, the tensors are group 32
    _break(awq, lambda t, c: c["quantization_config"].update(group_size=64))
    with pytest.raises(LoaderError, match=r"model\.layers\.0\.self_attn\.q_proj\.qzeros"):
        load_model(ModelConfig(path=awq), "cpu", progress=False)
    # missing scales of one shard of a fused layer
    awq2 = write_quantized_dir(str(tmp_path / "awq2"), fp, "awq", group_size=32)
    _break(awq2, lambda t, c: t.pop("model.layers.1.self_attn.k_proj.scales"))
    with pytest.raises(LoaderError, match=r"model\.layers\.1\.self_attn\.k_proj\.scales: missing"):
        load_model(ModelConfig(path=awq2), "cpu", progress=False)
    # shape mismatch of a W8A8 scale
    w8 = write_quantized_dir(str(tmp_path / "w8"), fp, "w8a8")
    _break(w8, lambda t, c: t.update({"model.layers.0.mlp.up_proj.weight_scale":
                                      t["model.layers.0.mlp.up_proj.weight_scale"][:-1]}))
    with pytest.raises(LoaderError, match=r"model\.layers\.0\.mlp\.up_proj\.weight_scale: checkpoint shape"):
        load_model(ModelConfig(path=w8), "cpu", progress=False)
    # an unsupported group size and method name the config field
    g = write_quantized_dir(str(tmp_path / "g"), fp, "gptq", group_size=32)
    _break(g, lambda t, c: c["quantization_config"].update(group_size=-1))
    with pytest.raises(LoaderError, match=r"quantization_config\.group_size"):
        load_model(ModelConfig(path=g), "cpu", progress=False)
    _break(g, lambda t, c: c["quantization_config"].update(quant_method="fp8"))
    with pytest.raises(LoaderError, match=r"quantization_config\.quant_method"):
        load_model(ModelConfig(path=g), "cpu", progress=False)


def test_quantization_value_must_fit_the_checkpoint(tmp_path, fp):
    awq = write_quantized_dir(str(tmp_path / "awq"), fp, "awq", group_size=32)
    with pytest.raises(LoaderError, match="model.quantization=none cannot load this awq checkpoint"):
        load_model(ModelConfig(path=awq, quantization="none"), "cpu", progress=False)
    load_model(ModelConfig(path=awq, quantization="w4a16"), "cpu", progress=False)
    flt = write_float_dir(str(tmp_path / "fp"), fp)
    with pytest.raises(LoaderError, match="needs a gptq checkpoint"):
        load_model(ModelConfig(path=flt, quantization="gptq"), "cpu", progress=False)


def test_gptq_error_feedback_beats_round_to_nearest():
    """scripts/quantize.py's GPTQ rounding against round-to-nearest (with clip search) on the same
    weights: the layer's output error on the calibration inputs, which GPTQ minimizes, must be at
    least 20% smaller."""
    from mindie_llm.layers import quant_w4a16 as w4
    from mindie_llm.ops import reference as ref

    q = quantize_script()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)        # correlated inputs
    w = torch.randn(48, 64, generator=g)
    h = 2.0 / x.shape[0] * (x.double().T @ x.double())
    codes, s, z = q.gptq_quantize(w, h, 32)
    w_gptq = ref.w4a16_dequantize(ref.w4a16_pack(codes), s, z, 32)
    c2, s2, z2 = w4.quantize_w4_groupwise(w, 32, clip_search=True)
    w_rtn = ref.w4a16_dequantize(ref.w4a16_pack(c2), s2, z2, 32)
    err_gptq = float((x @ (w_gptq - w).T).norm())
    err_rtn = float((x @ (w_rtn - w).T).norm())
    print(f"GPTQ / RTN output error: {err_gptq / err_rtn:.3f}")
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
