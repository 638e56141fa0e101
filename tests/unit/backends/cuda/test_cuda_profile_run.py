# SPDX-License-Identifier: Apache-2.0
"""The engine's hand-over to the CUDA backend: ``CudaPlatform.runner_kwargs`` (the deployment's
backend section as runner arguments) and the profiling step ``executor.profile_run.max_step``.

Oracles: the config fields themselves; for ``max_step`` the shapes of the batch it builds (it must
cover exactly ``max_num_batched_tokens`` tokens and stay inside its own one-block cache) and, on a
GPU, a lower bound on the measured peak counted from the step's own buffers (logits + probs of
every request, fp32)."""
from __future__ import annotations

import pytest
import torch
from mindie_llm.config import EngineConfig, ModelConfig

TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=2)


def _tiny(device: str):
    from mindie_llm.loader import load_model

    return load_model(ModelConfig(load_format="dummy", seed=3), "cpu", "float32", progress=False,
                      hf_config=TINY).model.to(device)


def _step(model, device, T, B):
    from mindie_llm.executor.profile_run import max_step

    return max_step(model, num_layers=2, num_kv_heads=2, head_dim=16, block_size=4, kv_dtype=torch.float32,
                    max_num_batched_tokens=T, max_num_seqs=B, vocab_size=256, device=torch.device(device))


def test_runner_kwargs_follow_the_backend_section():
    from mindie_llm.backends.cuda.platform import CudaPlatform

    def section(kw):     # the backend-section part (the rest are the platform's runner pieces)
        return {k: kw[k] for k in ("enable_cuda_graph", "cuda_graph_max_batch_size")}

    cfg = EngineConfig.from_kwargs(enforce_eager=True)
    kw = CudaPlatform.runner_kwargs(cfg)
    assert section(kw) == {"enable_cuda_graph": False, "cuda_graph_max_batch_size": 256}
    assert callable(kw["select_kernels"]) and kw["graph_wrapper_cls"].__name__ == "CudaGraphDecodeModel"
    cfg = EngineConfig.from_kwargs(backend__cuda_graph_max_batch_size=32)
    assert section(CudaPlatform.runner_kwargs(cfg)) == {"enable_cuda_graph": True, "cuda_graph_max_batch_size": 32}


@pytest.mark.parametrize("T,B", [(37, 8), (5, 16), (64, 1)])
def test_max_step_runs_on_the_reference_ops(T, B, monkeypatch):
    from mindie_llm.layers import attention

    seen = {}
    real = attention.AttentionMetadata.build

    def spy(*args, **kwargs):
        md = real(*args, **kwargs)
        seen["md"] = md
        return md

    monkeypatch.setattr(attention.AttentionMetadata, "build", staticmethod(spy))
    model = _tiny("cpu")
    run = _step(model, "cpu", T, B)
    md = seen["md"]
    assert md.num_tokens == T and md.num_reqs == min(T, B)
    assert int(md.slot_mapping.max()) < 4 and int(md.slot_mapping.min()) >= 0     # block 0 only
    assert int(md.block_tables.max()) == 0
    run()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_profiled_peak_covers_the_step_buffers():
    from mindie_llm.backends import get_platform

    platform = get_platform("cuda")
    model = _tiny("cuda")
    T, B = 512, 64
    peak = platform.profile_activation_peak(_step(model, "cuda", T, B))
    assert peak >= 2 * B * 256 * 4                                    # logits + probs, fp32
    assert platform.activation_peak_bytes == peak
