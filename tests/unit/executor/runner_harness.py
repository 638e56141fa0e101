# SPDX-License-Identifier: Apache-2.0
"""A scripted scheduler and a greedy loop for driving a ModelRunner directly with contract-2
messages (no engine, no C++ scheduler): shared by the CPU graph-runner tests and the GPU tests."""
from __future__ import annotations

import numpy as np
import torch

from mindie_llm.contract import SchedulerOutput
from mindie_llm.engine.new_requests import NewRequestTable
from mindie_llm.sampling_params import SamplingParams

BLOCK = 16
EOS = 2


class MiniScheduler:
    """Contract-2 outputs for a fixed set of requests: one step of whole-prompt prefills (one mixed
    chunk batch), then decode steps; each request holds consecutive blocks from the start. With
    ``finish_at={step: index}`` a request leaves the batch at that step (finished_ids)."""

    def __init__(self, prompts: list[list[int]], max_new: int, finish_at: dict[int, int] | None = None,
                 params: dict | None = None):
        self.prompts, self.max_new, self.step_no = prompts, max_new, 0
        self.new = NewRequestTable()
        for i, p in enumerate(prompts):
            sp = SamplingParams(**{**dict(temperature=0.0, max_tokens=max_new, ignore_eos=True), **(params or {})})
            ban = [EOS] if sp.min_tokens and not sp.ignore_eos else []
            self.new.add(i + 1, p, sp, seed=i, banned=ban)
        self.finish_at = dict(finish_at or {})
        need = [-(-(len(p) + max_new) // BLOCK) for p in prompts]
        starts = np.cumsum([1] + need[:-1])                     # block 0 is the null block
        self.blocks = [list(range(s, s + n)) for s, n in zip(starts, need)]
        self.num_blocks = int(starts[-1] + need[-1])
        self.active = list(range(len(prompts)))
        self.last: list[int] = []                               # sampled tokens of the last step, batch order

    def schedule(self) -> SchedulerOutput:
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
        return SchedulerOutput(req_ids=ids, num_scheduled_tokens=nsched, num_computed_tokens=ncomp,
                               input_token_ids=tokens, sample_mask=np.ones(B, bool), block_table_reset=reset,
                               new_block_offsets=offs, new_block_ids=new_ids, preempted_ids=e,
                               finished_ids=np.asarray(finished, np.int64),
                               finish_reasons=np.zeros(len(finished), np.int32),
                               num_batched_tokens=int(nsched.sum()), new_requests=self.new.take(ids))


def greedy(runner_cls, model, arch: dict, prompts: list[list[int]], device: str, max_new: int = 20,
           params: dict | None = None, finish_at: dict[int, int] | None = None, **kw) -> tuple[np.ndarray, object]:
    """Runs ``max_new`` steps of ``MiniScheduler`` through a runner; returns the tokens [B, max_new]
    (-1 after a request finished) and the runner."""
    from mindie_llm.executor.kv_cache import KVCacheSpec, allocate_kv_caches

    sched = MiniScheduler(prompts, max_new, finish_at, params)
    dtype = next(model.parameters()).dtype
    hd = arch["hidden_size"] // arch["num_attention_heads"]
    spec = KVCacheSpec(arch["num_hidden_layers"], arch["num_key_value_heads"], hd, BLOCK, dtype)
    caches = allocate_kv_caches(spec, sched.num_blocks, device)
    runner = runner_cls(model, arch["vocab_size"], caches, block_size=BLOCK, max_num_seqs=8,
                        max_num_batched_tokens=256, max_model_len=arch["max_position_embeddings"],
                        device=torch.device(device), **kw)
    out = {i + 1: [] for i in range(len(prompts))}
    for _ in range(max_new):
        res = runner.execute(sched.schedule())
        sched.last = res.token_ids.tolist()
        for rid, t in zip(res.req_ids.tolist(), sched.last):
            out[rid].append(t)
    n = max(len(v) for v in out.values())
    return np.array([v + [-1] * (n - len(v)) for v in out.values()]), runner   # [B, max_new], -1 after finish
