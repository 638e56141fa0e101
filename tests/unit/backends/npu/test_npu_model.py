# SPDX-License-Identifier: Apache-2.0
"""The whole model on the CPU through the NPU code path (NpuPlatform + its op table, every
torch_npu call bound and checked by the double) against the CPU backend on the same weights in
float16: greedy tokens identical and logits within tolerance, eager and with decode steps replayed
from (emulated) ACL graphs whose paged-attention tasks get the step's context lengths, on a tiny
random Llama (fast) and on the embedded SmolLM2-135M-Instruct (slow: loads the real model)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mindie_llm import LLM, SamplingParams
from mindie_llm.config import ModelConfig

TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
            max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=2)
NPU_OPS = {"npu_rms_norm", "npu_add_rms_norm", "_npu_rotary_embedding", "npu_scatter_pa_kv_cache",
           "_npu_paged_attention", "npu_fused_infer_attention_score", "npu_swiglu"}


def _generate(weights, device: str, prompts, max_tokens: int, runner_out: list | None = None, **kw):
    kw.setdefault("max_num_seqs", 4)
    llm = LLM(device=device, dtype="float16", block_size=128, num_blocks=32, max_model_len=1024,
              loaded_model=weights, **kw)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    if runner_out is not None:
        runner_out.append(llm.engine.runner)
    return [o.outputs[0].token_ids for o in outs]


def _logits(weights, prompt_lens, seed=0):
    """Logits of one mixed step: request 0 decodes after a prefill of 130 tokens (cache crosses a
    block), the others are fresh prompts; same KV cache contents on both paths."""
    from mindie_llm.layers.attention import AttentionMetadata

    model = weights.model
    rng = np.random.default_rng(seed)
    cfg = weights.arch
    cache = [torch.zeros(2, 8, 128, cfg.num_key_value_heads, cfg.head_dim, dtype=torch.float16)
             for _ in range(cfg.num_hidden_layers)]
    first = rng.integers(3, cfg.vocab_size, 130).tolist()
    md = AttentionMetadata.build([0], [130], [[1, 2]], 128)
    with torch.inference_mode():
        model(torch.tensor(first), torch.arange(130), cache, md)
        prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in prompt_lens]
        ids = torch.tensor([7] + sum(prompts, []))
        pos = torch.tensor([130] + sum((list(range(n)) for n in prompt_lens), []))
        tables = [[1, 2]] + [[3 + i] for i in range(len(prompts))]
        md = AttentionMetadata.build([130] + [0] * len(prompts), [1] + list(prompt_lens), tables, 128)
        hidden = model(ids, pos, cache, md)
        last = md.query_start_loc[1:].long() - 1
        return model.compute_logits(hidden[last]).float()


@pytest.fixture(scope="module")
def tiny():
    from mindie_llm.loader import load_model

    return load_model(ModelConfig(load_format="dummy", seed=5), "cpu", "float16", progress=False, hf_config=TINY)


@pytest.fixture(scope="module")
def tiny_cpu(tiny):
    from mindie_llm.backends import get_platform

    get_platform("cpu")
    prompts = [np.random.default_rng(i).integers(3, 300, n).tolist() for i, n in enumerate((1, 9, 140))]
    return prompts, _generate(tiny, "cpu", prompts, 6, max_num_batched_tokens=64), _logits(tiny, (5, 17))


def test_tiny_model_greedy_and_logits_match_cpu_backend(tiny, tiny_cpu, npu_double):
    prompts, cpu_tokens, cpu_logits = tiny_cpu
    # max_num_batched_tokens=64 splits the 140-token prompt: chunked prefill mixed with decodes
    npu_tokens = _generate(tiny, "npu", prompts, 6, max_num_batched_tokens=64, enforce_eager=True)
    assert npu_tokens == cpu_tokens
    assert NPU_OPS <= set(npu_double.names())
    npu_logits = _logits(tiny, (5, 17))
    err = float((npu_logits - cpu_logits).norm() / cpu_logits.norm())
    assert err < 1e-2, err


def test_tiny_model_with_npu_graphs_matches_cpu_backend(tiny, tiny_cpu, npu_double):
    prompts, cpu_tokens, _ = tiny_cpu
    runners: list = []
    assert _generate(tiny, "npu", prompts, 6, runners, max_num_batched_tokens=64) == cpu_tokens
    gm = runners[0].graph_model
    assert sorted(gm.graphs) == [1, 2, 4] and gm.num_replays > 0
    assert npu_double.graphs.num_updates >= gm.num_replays * TINY["num_hidden_layers"]


def test_npu_graphs_without_the_task_update_replay_stale_lengths(tiny, tiny_cpu, npu_double, monkeypatch):
    """The emulated graph keeps capture-time host values, as the device does: skipping the
    paged-attention task update (graph.py) must change the tokens."""
    from mindie_llm.backends.npu.graph import NPUGraphDecodeModel

    prompts, cpu_tokens, _ = tiny_cpu
    monkeypatch.setattr(NPUGraphDecodeModel, "_update_tasks", lambda self, bs: None)
    assert _generate(tiny, "npu", prompts, 6, max_num_batched_tokens=64) != cpu_tokens


@pytest.fixture(scope="module")
def smollm():
    from mindie_llm.loader import load_model

    return load_model(ModelConfig(dtype="float16"), "cpu", "float16", progress=False)


@pytest.fixture(scope="module")
def smollm_cpu(smollm):
    from mindie_llm.backends import get_platform

    get_platform("cpu")
    prompts = ["The capital of France is", "def fibonacci(n):"]
    return prompts, _generate(smollm, "cpu", prompts, 6, max_num_seqs=2, max_num_batched_tokens=32)


@pytest.mark.slow
def test_smollm2_greedy_identical_to_cpu_backend(smollm, smollm_cpu, npu_double):
    prompts, cpu_tokens = smollm_cpu
    # eager: the graph path is covered on the tiny model (capturing 30 layers on the CPU is minutes)
    assert _generate(smollm, "npu", prompts, 6, max_num_seqs=2, max_num_batched_tokens=32,
                     enforce_eager=True) == cpu_tokens
    assert NPU_OPS - {"npu_fused_infer_attention_score"} <= set(npu_double.names())


def test_logit_bias_on_the_npu_path_eager_and_with_graphs(tiny, npu_double):
    # Oracle: the definition (+100 forces the token), greedy and seeded, eager and through the
    # graph-replay decode path (which must hand biased rows to the Sampler, not take the argmax).
    prompts = [[5, 6, 7], [9] * 12]
    sps = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias={77: 100.0}),
           SamplingParams(temperature=1.0, seed=1, max_tokens=5, ignore_eos=True, logit_bias={77: 100.0})]
    for eager in (True, False):
        llm = LLM(device="npu", dtype="float16", block_size=128, num_blocks=32, max_model_len=1024,
                  loaded_model=tiny, max_num_seqs=4, enforce_eager=eager)
        outs = llm.generate(prompts, sps, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [[77] * 5] * 2, eager
        if not eager:
            assert llm.engine.runner.graph_model.num_replays > 0
