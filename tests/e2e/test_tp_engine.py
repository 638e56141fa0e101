# SPDX-License-Identifier: Apache-2.0
"""The whole engine with tensor parallelism (MultiprocExecutor: rank 0 here, the other ranks
started as child processes, gloo on loopback) against one process (the oracle): the same tokens,
greedy and seeded sampling, through chunked prefill, prefix caching and mixed batches, with
micro-batch overlap off and on; the embedded SmolLM2 over three ranks. Every worker process is
gone after shutdown."""
from __future__ import annotations

import os

import pytest
import torch

from mindie_llm import LLM, SamplingParams

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   attention_bias=True, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM._from_config(cfg).float().eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.5)
            elif n.endswith("proj.weight"):
                p.mul_(8.0)           # peaked distributions: sampling differences show
    path = tmp_path_factory.mktemp("tiny_tp")
    hf.save_pretrained(path, safe_serialization=True)
    return str(path)


PROMPTS = [[1, 5, 9, 22, 40, 41, 42, 43, 7, 8, 9, 10, 11], [3, 4, 5], [7] * 20, [1, 5, 9, 22, 40, 41, 2]]


def _run(path: str, tp: int, overlap: bool = False) -> tuple[list, list]:
    llm = LLM(model=path, dtype="float32", num_blocks=96, block_size=4, tensor_parallel_size=tp,
              max_num_batched_tokens=16, enable_prefix_caching=True, parallel__micro_batch_overlap=overlap,
              num_threads=1)
    try:
        greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        sampled = [SamplingParams(max_tokens=10, temperature=1.0, top_k=20, seed=100 + i, ignore_eos=True)
                   for i in range(len(PROMPTS))]
        g = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, greedy, use_tqdm=False)]
        s = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, sampled, use_tqdm=False)]
        children = list(getattr(llm.engine.executor, "_children", {}).values())
    finally:
        llm.engine.shutdown()
    for c in children:
        assert c.poll() is not None, "a worker process outlived shutdown"
    return g, s


def test_tp2_tokens_identical_to_one_process(tiny):
    want = _run(tiny, 1)
    assert len({tuple(t) for t in want[1]}) > 1, "the sampled outputs do not depend on the seed"
    assert _run(tiny, 2, overlap=False) == want
    assert _run(tiny, 2, overlap=True) == want


def test_smollm2_over_three_ranks_matches_one_process():
    prompts = ["The capital of France is", "def fibonacci(n):"]
    sp = SamplingParams(max_tokens=8, temperature=0.0)
    outs = []
    for tp in (1, 3):
        llm = LLM(dtype="float32", tensor_parallel_size=tp, kv_cache_memory_gb=0.05, num_threads=1)
        try:
            outs.append([r.outputs[0].token_ids for r in llm.generate(prompts, sp, use_tqdm=False)])
        finally:
            llm.engine.shutdown()
    assert outs[0] == outs[1]
    assert all(len(t) == 8 for t in outs[0])


def test_tp_refused_when_heads_do_not_split():
    with pytest.raises(ValueError, match="num_attention_heads=9 is not divisible by tensor_parallel_size=2"):
        LLM(dtype="float32", tensor_parallel_size=2, kv_cache_memory_gb=0.05, num_threads=1)
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _is_our_worker(int(p))]


def _is_our_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return ppid == os.getpid() and b"multiproc_executor" in cmd
