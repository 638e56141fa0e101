# SPDX-License-Identifier: Apache-2.0
"""FP8 weights (e4m3 per output channel, dynamic per-token e4m3 activations) on the CPU: the linear
against ops/reference.py (dequantize, then matmul) and against the float product; a float model
quantized at load (``model.quantization=fp8``); a hand-built compressed-tensors FP8 checkpoint
(llm-compressor FP8_DYNAMIC layout: per-channel and per-tensor ``weight_scale``) detected and
loaded; malformed ones refused naming the tensor. The CUDA product (torch._scaled_mm) is checked
in tests/unit/backends/cuda."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from mindie_llm.config import ModelConfig
from mindie_llm.loader import LoaderError, load_model
from mindie_llm.ops import reference as ref
from quant_fixtures import TINY, quantize_script, tiny_float

IDS = list(range(3, 35))


def _logits(loaded):
    q = quantize_script()
    return loaded.model.compute_logits(q.forward_hidden(loaded.model, loaded.arch, IDS))


@pytest.fixture(scope="module")
def fp():
    return tiny_float()


def test_fp8_rows_and_matmul_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    q, s = ref.quantize_fp8_rows(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (48,)
    assert float(q.float().abs().amax(dim=1).min()) == 448.0                    # each row uses the range
    assert float(((q.float() * s[:, None] - w).norm() / w.norm())) < 0.05       # e4m3: ~3 mantissa bits
    x = torch.randn(5, 64, generator=g)
    y = ref.fp8_matmul(x, q, s)
    assert float(((y - x @ w.T).norm() / (x @ w.T).norm())) < 0.08


def _ct_fp8_dir(path, fp, per_tensor=False, mutate=None):
    """A compressed-tensors FP8_DYNAMIC checkpoint of ``fp``'s weights, written by hand."""
    q = quantize_script()
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for name, mod in fp.model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{name}.{pname}"
            if pname == "weight" and hasattr(mod, "linear_method") and not full.startswith("lm_head"):
                for hf, rows in q._split(name, mod, p.detach()):
                    if per_tensor:
                        s = rows.abs().amax().clamp(min=1e-12) / 448.0
                        tensors[f"{hf}.weight"] = (rows / s).to(torch.float8_e4m3fn)
                        tensors[f"{hf}.weight_scale"] = s.reshape(1).float()
                    else:
                        wq, s = ref.quantize_fp8_rows(rows)
                        tensors[f"{hf}.weight"], tensors[f"{hf}.weight_scale"] = wq, s[:, None].contiguous()
            else:
                tensors[full] = p.detach().contiguous()
    if mutate:
        mutate(tensors)
    cfg = q.hf_config(fp.arch)
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"],
                                      "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                  "strategy": "tensor" if per_tensor else "channel", "dynamic": False},
                                      "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                                            "strategy": "token", "dynamic": True}}}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return path


@pytest.mark.parametrize("per_tensor", [False, True])
def test_compressed_tensors_fp8_checkpoint(tmp_path, fp, per_tensor):
    path = _ct_fp8_dir(str(tmp_path / "ct"), fp, per_tensor)
    m = load_model(ModelConfig(path=path), "cpu", "float32", progress=False)
    lin = m.model.model.layers[0].mlp.gate_up_proj
    assert lin.weight is None and lin.linear_method.__name__ == "fp8_linear"
    assert lin.qweight.dtype == torch.float8_e4m3fn and lin.w_scale.shape == (lin.out_features,)
    x = torch.randn(3, lin.in_features)
    want = ref.fp8_matmul(x, lin.qweight, lin.w_scale)                          # the dequantized oracle
    torch.testing.assert_close(lin.linear_method(lin, x), want)
    ref_logits = _logits(fp)
    err = float((_logits(m) - ref_logits).abs().max() / ref_logits.abs().max())
    assert err < 0.2, err                  # measured 0.13-0.14 (random weights; e4m3 has 3 mantissa bits)


def test_float_model_quantized_at_load(fp):
    m = load_model(ModelConfig(load_format="dummy", quantization="fp8", seed=0), "cpu", "float32",
                   progress=False, hf_config=TINY)
    lin = m.model.model.layers[1].self_attn.o_proj
    assert lin.weight is None and lin.qweight.dtype == torch.float8_e4m3fn
    ref_logits = _logits(fp)                                                    # same seed: same float weights
    err = float((_logits(m) - ref_logits).abs().max() / ref_logits.abs().max())
    assert err < 0.2, err                  # measured 0.13-0.14 (random weights; e4m3 has 3 mantissa bits)


def test_malformed_fp8_checkpoints_name_the_tensor(tmp_path, fp):
    def drop(t):
        del t["model.layers.0.self_attn.k_proj.weight_scale"]

    def wrong_dtype(t):
        t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"].float()

    def wrong_shape(t):
        t["model.layers.0.mlp.down_proj.weight_scale"] = torch.ones(7, 1)

    for fn, tensor in ((drop, "model.layers.0.self_attn.k_proj.weight_scale"),
                       (wrong_dtype, "model.layers.1.mlp.up_proj.weight"),
                       (wrong_shape, "model.layers.0.mlp.down_proj.weight_scale")):
        path = _ct_fp8_dir(str(tmp_path / fn.__name__), fp, mutate=fn)
        with pytest.raises(LoaderError) as e:
            load_model(ModelConfig(path=path), "cpu", "float32", progress=False)
        assert e.value.tensor == tensor or tensor in str(e.value), str(e.value)


def test_fp8_config_detection():
    from mindie_llm.loader.quant_config import choose_scheme, detect_quantization

    qc = {"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}}
    assert detect_quantization({"quantization_config": qc}, "x")[0] == "fp8"
    qc["config_groups"]["g"]["input_activations"]["dynamic"] = False              # static scales: refused
    with pytest.raises(LoaderError, match="quantization_config.config_groups: only FP8"):
        detect_quantization({"quantization_config": qc}, "x")
    assert choose_scheme("fp8", None, "x") == ("fp8", {"from_float": True})
    with pytest.raises(LoaderError, match="model.quantization=w8a8 cannot load this fp8 checkpoint"):
        choose_scheme("w8a8", ("fp8", {}), "x")
