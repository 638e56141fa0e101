# SPDX-License-Identifier: Apache-2.0
"""The whole model on the CUDA backend (Triton ops, CudaModelRunner with decode CUDA graphs and
pinned staging) against the CPU reference backend on the same random weights (logits close; greedy
tokens identical in fp32) and against transformers on the GPU. Needs a GPU: skipped without one."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cuda_checks import rel_err

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

ARCH = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256, intermediate_size=688,
            num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
            rope_theta=10000.0, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)
PROMPT_LENS = [1, 5, 17, 31, 64]
BLOCK = 16


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


class MiniScheduler:
    """Contract-2 outputs for a fixed set of requests: one step of whole-prompt prefills (one mixed
    chunk batch), then decode steps; each request holds consecutive blocks from the start. With
    ``finish_at={step: index}`` a request leaves the batch at that step (finished_ids)."""

    def __init__(self, prompts: list[list[int]], max_new: int, finish_at: dict[int, int] | None = None):
        self.prompts, self.max_new, self.step_no = prompts, max_new, 0
        self.finish_at = dict(finish_at or {})
        need = [-(-(len(p) + max_new) // BLOCK) for p in prompts]
        starts = np.cumsum([1] + need[:-1])                     # block 0 is the null block
        self.blocks = [list(range(s, s + n)) for s, n in zip(starts, need)]
        self.num_blocks = int(starts[-1] + need[-1])
        self.active = list(range(len(prompts)))
        self.last: list[int] = []                               # sampled tokens of the last step, batch order

    def schedule(self) -> SimpleNamespace:
        finished = []
        if self.step_no in self.finish_at:
            i = self.finish_at[self.step_no]
            keep = [k for k, a in enumerate(self.active) if a != i]
            self.last = [self.last[k] for k in keep]
            self.active = [self.active[k] for k in keep]
            finished = [i + 1]
        act = self.active
        B = len(act)
        ids = np.asarray([a + 1 for a in act], dtype=np.int64)
        if self.step_no == 0:
            nsched = np.array([len(self.prompts[a]) for a in act], np.int32)
            ncomp = np.zeros(B, np.int32)
            tokens = np.concatenate([np.asarray(self.prompts[a], np.int32) for a in act])
            reset = np.ones(B, bool)
            offs = np.concatenate([[0], np.cumsum([len(self.blocks[a]) for a in act])]).astype(np.int32)
            new_ids = np.concatenate([np.asarray(self.blocks[a], np.int32) for a in act])
        else:
            nsched = np.ones(B, np.int32)
            ncomp = np.array([len(self.prompts[a]) + self.step_no - 1 for a in act], np.int32)
            tokens = np.asarray(self.last, np.int32)
            reset = np.zeros(B, bool)
            offs = np.zeros(B + 1, np.int32)
            new_ids = np.zeros(0, np.int32)
        self.step_no += 1
        e = np.zeros(0, np.int64)
        return SimpleNamespace(req_ids=ids, num_scheduled_tokens=nsched, num_computed_tokens=ncomp,
                               input_token_ids=tokens, sample_mask=np.ones(B, bool), block_table_reset=reset,
                               new_block_offsets=offs, new_block_ids=new_ids, preempted_ids=e,
                               finished_ids=np.asarray(finished, np.int64), num_batched_tokens=int(nsched.sum()))


def _greedy(runner_cls, model, device: str, max_new: int = 20, params: dict | None = None,
            finish_at: dict[int, int] | None = None, **kw) -> tuple[np.ndarray, object]:
    from mindie_llm.executor.kv_cache import KVCacheSpec, allocate_kv_caches
    from mindie_llm.sampling_params import SamplingParams

    prompts = _prompts()
    sched = MiniScheduler(prompts, max_new, finish_at)
    dtype = next(model.parameters()).dtype
    hd = ARCH["hidden_size"] // ARCH["num_attention_heads"]
    spec = KVCacheSpec(ARCH["num_hidden_layers"], ARCH["num_key_value_heads"], hd, BLOCK, dtype)
    caches = allocate_kv_caches(spec, sched.num_blocks, device)
    runner = runner_cls(model, ARCH["vocab_size"], caches, block_size=BLOCK, max_num_seqs=8,
                        max_num_batched_tokens=256, max_model_len=ARCH["max_position_embeddings"],
                        eos_token_ids=[2], device=torch.device(device), **kw)
    for i, p in enumerate(prompts):
        sp = {**dict(temperature=0.0, max_tokens=max_new, ignore_eos=True), **(params or {})}
        runner.add_request(i + 1, p, SamplingParams(**sp), seed=i)
    out = {i + 1: [] for i in range(len(prompts))}
    for _ in range(max_new):
        res = runner.execute(sched.schedule())
        sched.last = res.sampled_token_ids.tolist()
        for rid, t in zip(res.req_ids.tolist(), sched.last):
            out[rid].append(t)
    n = max(len(v) for v in out.values())
    return np.array([v + [-1] * (n - len(v)) for v in out.values()]), runner   # [B, max_new], -1 after finish


def test_greedy_tokens_identical_to_cpu_reference_fp32():
    from mindie_llm.backends.cuda.model_runner import CudaModelRunner
    from mindie_llm.executor.model_runner import ModelRunner

    ref, _ = _greedy(ModelRunner, _load("cpu", "float32"), "cpu")
    model = _load("cuda", "float32")
    graph_tokens, runner = _greedy(CudaModelRunner, model, "cuda", enable_cuda_graph=True,
                                   cuda_graph_max_batch_size=8)
    assert runner.graph_model is not None and runner.graph_model.num_replays >= 19   # decodes were replayed
    assert runner.num_overlapped_steps >= 10          # most decodes were the speculated next step
    eager_tokens, _ = _greedy(CudaModelRunner, model, "cuda", enable_cuda_graph=False)
    np.testing.assert_array_equal(eager_tokens, ref)
    np.testing.assert_array_equal(graph_tokens, ref)


def test_overlap_dropped_when_the_batch_changes():
    """Requests leave the batch mid-way (a speculated step no longer matches): tokens still equal
    the CPU reference's for the same schedule."""
    from mindie_llm.backends.cuda.model_runner import CudaModelRunner
    from mindie_llm.executor.model_runner import ModelRunner

    finish_at = {5: 2, 9: 0}
    ref, _ = _greedy(ModelRunner, _load("cpu", "float32"), "cpu", finish_at=finish_at)
    out, runner = _greedy(CudaModelRunner, _load("cuda", "float32"), "cuda", finish_at=finish_at,
                          enable_cuda_graph=True, cuda_graph_max_batch_size=8)
    assert runner.num_overlapped_steps >= 5
    np.testing.assert_array_equal(out, ref)


def test_sampling_path_graph_matches_eager():
    """Seeded top-k sampling with logprobs: the graph's logits through the Sampler give the same
    tokens as the eager path (counter-based draws depend only on seed, position and logits)."""
    from mindie_llm.backends.cuda.model_runner import CudaModelRunner

    model = _load("cuda", "float32")
    params = dict(temperature=0.8, top_k=50, logprobs=2)
    graph_tokens, runner = _greedy(CudaModelRunner, model, "cuda", params=params, enable_cuda_graph=True,
                                   cuda_graph_max_batch_size=8)
    assert runner.graph_model.num_replays >= 19
    eager_tokens, _ = _greedy(CudaModelRunner, model, "cuda", params=params, enable_cuda_graph=False)
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
    from mindie_llm.backends.cuda.model_runner import CudaModelRunner
    from mindie_llm.executor.kv_cache import KVCacheSpec, allocate_kv_caches
    from mindie_llm.sampling_params import SamplingParams

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
    runner = CudaModelRunner(model, ARCH["vocab_size"], allocate_kv_caches(spec, sched.num_blocks, "cuda"),
                             block_size=BLOCK, max_num_seqs=4, max_num_batched_tokens=128,
                             max_model_len=512, eos_token_ids=[2], device=torch.device("cuda"),
                             enable_cuda_graph=True, cuda_graph_max_batch_size=4)
    runner.add_request(1, prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), seed=0)
    toks = []
    for _ in range(12):
        res = runner.execute(sched.schedule())
        sched.last = res.sampled_token_ids.tolist()
        toks.append(int(res.sampled_token_ids[0]))
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
