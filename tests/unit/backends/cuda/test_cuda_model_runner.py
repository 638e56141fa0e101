# SPDX-License-Identifier: Apache-2.0
"""The whole model on the CUDA backend (Triton ops, the graph runner with decode CUDA graphs and
pinned staging) against the CPU reference backend on the same random weights (logits close; greedy
tokens identical in fp32) and against transformers on the GPU. Needs a GPU: skipped without one."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cuda_checks import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "executor"))
from runner_harness import BLOCK, MiniScheduler, greedy  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

ARCH = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256, intermediate_size=688,
            num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
            rope_theta=10000.0, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)
PROMPT_LENS = [1, 5, 17, 31, 64]


def _load(device: str, dtype: str, seed: int = 0):
    from mindie_llm.backends import get_platform
    from mindie_llm.config import ModelConfig
    from mindie_llm.loader import load_model

    get_platform(device)                                        # registers the device's ops
    # Generated on the CPU and moved: dummy weights are seeded per device type, and the oracle
    # (the CPU reference backend) must see the same weights.
    return load_model(ModelConfig(load_format="dummy", dtype=dtype, seed=seed), "cpu", dtype,
                      hf_config=ARCH, progress=False).model.to(device)


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, ARCH["vocab_size"], n).tolist() for n in PROMPT_LENS]


def _greedy(runner_cls, model, device: str, max_new: int = 20, params: dict | None = None,
            finish_at: dict[int, int] | None = None, **kw) -> tuple[np.ndarray, object]:
    return greedy(runner_cls, model, ARCH, _prompts(), device, max_new, params, finish_at, **kw)


def _cuda_runner(*args, **kw):
    """The executor's graph runner with the CUDA platform's pieces."""
    from mindie_llm.backends.cuda.platform import CudaPlatform
    from mindie_llm.executor.graph_runner import GraphModelRunner

    return GraphModelRunner(*args, **{**CudaPlatform.runner_kwargs(None), **kw})


def test_greedy_tokens_identical_to_cpu_reference_fp32():
    from mindie_llm.executor.model_runner import ModelRunner

    ref, _ = _greedy(ModelRunner, _load("cpu", "float32"), "cpu")
    model = _load("cuda", "float32")
    graph_tokens, runner = _greedy(_cuda_runner, model, "cuda", enable_cuda_graph=True,
                                   cuda_graph_max_batch_size=8)
    assert runner.graph_model is not None and runner.graph_model.num_replays >= 19   # decodes were replayed
    assert runner.num_overlapped_steps >= 10          # most decodes were the speculated next step
    eager_tokens, _ = _greedy(_cuda_runner, model, "cuda", enable_cuda_graph=False)
    np.testing.assert_array_equal(eager_tokens, ref)
    np.testing.assert_array_equal(graph_tokens, ref)


def test_overlap_dropped_when_the_batch_changes():
    """Requests leave the batch mid-way (a speculated step no longer matches): tokens still equal
    the CPU reference's for the same schedule."""
    from mindie_llm.executor.model_runner import ModelRunner

    finish_at = {5: 2, 9: 0}
    ref, _ = _greedy(ModelRunner, _load("cpu", "float32"), "cpu", finish_at=finish_at)
    out, runner = _greedy(_cuda_runner, _load("cuda", "float32"), "cuda", finish_at=finish_at,
                          enable_cuda_graph=True, cuda_graph_max_batch_size=8)
    assert runner.num_overlapped_steps >= 5
    np.testing.assert_array_equal(out, ref)


def test_sampling_path_graph_matches_eager():
    """Seeded top-k sampling with logprobs: the graph's logits through the Sampler give the same
    tokens as the eager path (counter-based draws depend only on seed, position and logits)."""

    model = _load("cuda", "float32")
    params = dict(temperature=0.8, top_k=50, logprobs=2)
    graph_tokens, runner = _greedy(_cuda_runner, model, "cuda", params=params, enable_cuda_graph=True,
                                   cuda_graph_max_batch_size=8)
    assert runner.graph_model.num_replays >= 19
    eager_tokens, _ = _greedy(_cuda_runner, model, "cuda", params=params, enable_cuda_graph=False)
    np.testing.assert_array_equal(graph_tokens, eager_tokens)


def _prefill_logits(model, device: str) -> torch.Tensor:
    """Logits of the last token of each prompt, all prompts in one mixed batch."""
    from mindie_llm.layers.attention import AttentionMetadata

    prompts = _prompts(1)
    lens = [len(p) for p in prompts]
    dtype = next(model.parameters()).dtype
    hd = ARCH["hidden_size"] // ARCH["num_attention_heads"]
    nb = [-(-n // BLOCK) for n in lens]
    caches = [torch.zeros(2, 1 + sum(nb), BLOCK, ARCH["num_key_value_heads"], hd, dtype=dtype, device=device)
              for _ in range(ARCH["num_hidden_layers"])]
    bt = torch.zeros(len(lens), max(nb), dtype=torch.int32)
    slots, pos, start = [], [], 1
    for i, (n, b) in enumerate(zip(lens, nb)):
        bt[i, :b] = torch.arange(start, start + b)
        slots += [start * BLOCK + j for j in range(n)]
        pos += list(range(n))
        start += b
    qsl = torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int32)
    md = AttentionMetadata(slot_mapping=torch.tensor(slots, device=device), query_start_loc=qsl.to(device),
                           seq_lens=torch.tensor(lens, dtype=torch.int32, device=device), block_tables=bt.to(device),
                           num_decodes=1, max_query_len=max(lens), max_seq_len=max(lens))
    ids = torch.tensor(sum(prompts, []), device=device)
    with torch.no_grad():
        hidden = model(ids, torch.tensor(pos, device=device), caches, md)      # [T, H]
        return model.compute_logits(hidden[qsl[1:].to(device).long() - 1]).float().cpu()   # [B, V]


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_logits_close_to_cpu_reference(dtype, tol):
    ref = _prefill_logits(_load("cpu", "float32"), "cpu")
    out = _prefill_logits(_load("cuda", dtype), "cuda")
    assert rel_err(out, ref) < tol


def test_against_transformers_on_gpu():
    transformers = pytest.importorskip("transformers")
    from mindie_llm.executor.kv_cache import KVCacheSpec, allocate_kv_caches

    cfg = transformers.LlamaConfig(**{k: v for k, v in ARCH.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).to("cuda", torch.float32).eval()
    model = _load("cuda", "float32")
    model.load_weights((k, v) for k, v in hf.state_dict().items())
    prompt = _prompts(2)[3]
    with torch.no_grad():
        hf_logits = hf(torch.tensor([prompt], device="cuda")).logits[0, -1].float().cpu()    # [V]
        gen = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=12, min_new_tokens=12,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].cpu().numpy()
    # the same prompt through our runner: greedy tokens identical to transformers' generate
    sched = MiniScheduler([prompt], 12)
    spec = KVCacheSpec(ARCH["num_hidden_layers"], ARCH["num_key_value_heads"], 32, BLOCK, torch.float32)
    runner = _cuda_runner(model, ARCH["vocab_size"], allocate_kv_caches(spec, sched.num_blocks, "cuda"),
                          block_size=BLOCK, max_num_seqs=4, max_num_batched_tokens=128,
                          max_model_len=512, device=torch.device("cuda"),
                          enable_cuda_graph=True, cuda_graph_max_batch_size=4)
    toks = []
    for _ in range(12):
        res = runner.execute(sched.schedule())
        sched.last = res.token_ids.tolist()
        toks.append(int(res.token_ids[0]))
    np.testing.assert_array_equal(np.asarray(toks), gen)
    # logits of the prompt's last token against transformers' (fp32, same weights)
    assert rel_err(_single_prompt_logits(model, prompt), hf_logits) < 1e-4


def _single_prompt_logits(model, prompt: list[int]) -> torch.Tensor:
    from mindie_llm.layers.attention import AttentionMetadata

    n, nb = len(prompt), -(-len(prompt) // BLOCK)
    caches = [torch.zeros(2, 1 + nb, BLOCK, ARCH["num_key_value_heads"], 32, device="cuda")
              for _ in range(ARCH["num_hidden_layers"])]
    md = AttentionMetadata(slot_mapping=torch.arange(BLOCK, BLOCK + n, device="cuda"),
                           query_start_loc=torch.tensor([0, n], dtype=torch.int32, device="cuda"),
                           seq_lens=torch.tensor([n], dtype=torch.int32, device="cuda"),
                           block_tables=torch.arange(1, nb + 1, dtype=torch.int32, device="cuda")[None],
                           num_decodes=0, max_query_len=n, max_seq_len=n)
    with torch.no_grad():
        hidden = model(torch.tensor(prompt, device="cuda"), torch.arange(n, device="cuda"), caches, md)
        return model.compute_logits(hidden[-1:])[0].float().cpu()
