# SPDX-License-Identifier: Apache-2.0
"""The executor's GraphModelRunner on the CPU with a stand-in graph wrapper whose "replay" runs the
captured function on the runner's persistent buffers (what a device graph does), so the padding,
pinned-staging layout and next-decode overlap logic run in CI. Oracle: the plain ModelRunner on
the same weights and schedule (greedy tokens identical; seeded sampling identical)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from runner_harness import greedy
from mindie_llm.executor.graph_runner import GraphModelRunner
from mindie_llm.executor.model_runner import ModelRunner
from mindie_llm.ops.attention_metadata import AttentionMetadata

ARCH = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
            rope_theta=10000.0, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)


class _Event:
    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


class ReplayWrapper(torch.nn.Module):
    """The graph-wrapper interface of backends/cuda/graph.py; a "graph" is a closure over the
    runner's buffers, run at replay time."""

    batch_sizes_for = staticmethod(lambda m: sorted({1, 2, 4, m}))
    eager_token_buckets = staticmethod(lambda t: [])

    def __init__(self, model, runner, batch_sizes, num_kv_heads, max_model_len):
        super().__init__()
        self.inner, self.runner, self.batch_sizes = model, runner, sorted(batch_sizes)
        self.max_model_len = max_model_len
        self.graphs, self.logits, self.greedy, self.num_replays = {}, {}, {}, 0

    def compute_logits(self, hidden):
        return self.inner.compute_logits(hidden)

    def capture(self, kv_caches) -> float:
        r = self.runner
        for bs in self.batch_sizes:
            def run(bs=bs):
                r.query_start_loc_buf[:bs + 1].copy_(torch.arange(bs + 1, dtype=torch.int32))
                md = AttentionMetadata(slot_mapping=r.slot_mapping_buf[:bs], query_start_loc=r.query_start_loc_buf[:bs + 1],
                                       seq_lens=r.seq_lens_buf[:bs], block_tables=r.block_tables_buf[:bs],
                                       num_decodes=bs, max_query_len=1, max_seq_len=self.max_model_len)
                live = r.slot_mapping_buf[:bs] >= 0      # padding rows write no KV and are ignored
                n = int(live.sum())
                md.slot_mapping, md.seq_lens, md.query_start_loc = (md.slot_mapping[:n], md.seq_lens[:n],
                                                                    md.query_start_loc[:n + 1])
                md.block_tables, md.num_decodes = md.block_tables[:n], n
                hidden = self.inner(r.input_ids_buf[:n], r.positions_buf[:n], kv_caches, md)
                logits = self.inner.compute_logits(hidden)
                self.logits[bs] = torch.zeros(bs, logits.shape[1])
                self.logits[bs][:n] = logits
                self.greedy[bs] = torch.zeros(bs, dtype=torch.int64)
                self.greedy[bs][:n] = logits.argmax(-1)
            self.graphs[bs] = run
        return 0.0

    def _bucket(self, n):
        return next((bs for bs in self.batch_sizes if bs >= n), None)

    def replay(self, n):
        bs = self._bucket(n)
        self.runner.padded_batch_size = 0
        self.graphs[bs]()
        self.num_replays += 1
        return bs

    def forward(self, *args):
        return self.inner(*args)


def _model():
    from mindie_llm.config import ModelConfig
    from mindie_llm.loader import load_model

    return load_model(ModelConfig(load_format="dummy", dtype="float32", seed=0), "cpu", "float32",
                      hf_config=ARCH, progress=False).model


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, ARCH["vocab_size"], n).tolist() for n in (1, 5, 17)]


def _graph_runner(*args, **kw):
    return GraphModelRunner(*args, graph_wrapper_cls=ReplayWrapper, event_cls=_Event, synchronize=lambda d: None,
                            pin_memory=False, enable_cuda_graph=True, cuda_graph_max_batch_size=4, **kw)


@pytest.mark.parametrize("finish_at", [None, {4: 1}])
def test_graph_runner_greedy_equals_plain_runner(finish_at):
    model = _model()
    ref, _ = greedy(ModelRunner, model, ARCH, _prompts(), "cpu", max_new=10, finish_at=finish_at)
    out, runner = greedy(_graph_runner, model, ARCH, _prompts(), "cpu", max_new=10, finish_at=finish_at)
    assert runner.graph_model.num_replays >= 9                 # decodes went through the "graph"
    assert runner.num_overlapped_steps >= 4                    # the speculated next decode was used
    np.testing.assert_array_equal(out, ref)


def test_graph_runner_seeded_sampling_equals_plain_runner():
    model = _model()
    params = dict(temperature=0.8, top_k=20, logprobs=2)
    ref, _ = greedy(ModelRunner, model, ARCH, _prompts(), "cpu", max_new=8, params=params)
    out, runner = greedy(_graph_runner, model, ARCH, _prompts(), "cpu", max_new=8, params=params)
    assert runner.graph_model.num_replays >= 7 and runner.num_overlapped_steps == 0   # sampling: no overlap
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("params", [None, dict(temperature=0.8, top_k=20, logprobs=2)])
def test_graph_runner_async_scheduling_equals_plain_runner(params):
    """Asynchronous scheduling through the graph runner's replay: the step queued ahead is used
    (and used without the row that finished); tokens equal the plain synchronous runner's."""
    model = _model()
    ref, _ = greedy(ModelRunner, model, ARCH, _prompts(), "cpu", max_new=10, params=params, finish_at={4: 1})
    out, runner = greedy(_graph_runner, model, ARCH, _prompts(), "cpu", max_new=10, params=params,
                         finish_at={4: 1}, async_scheduling=True)
    assert runner.num_ahead_used >= 7 and runner.num_ahead_trimmed == 1
    assert runner.graph_model.num_replays >= 8
    np.testing.assert_array_equal(out, ref)


def test_graph_runner_applies_logit_bias_on_greedy_decodes():
    # A greedy decode that takes the graph's argmax would skip the bias: such rows go to the Sampler.
    model = _model()
    params = dict(logit_bias={7: 100.0, 8: -100.0})
    ref, _ = greedy(ModelRunner, model, ARCH, _prompts(), "cpu", max_new=6, params=params)
    out, runner = greedy(_graph_runner, model, ARCH, _prompts(), "cpu", max_new=6, params=params)
    assert (ref == 7).all()
    assert runner.graph_model.num_replays >= 5 and runner.num_overlapped_steps == 0
    np.testing.assert_array_equal(out, ref)


def test_graph_runner_applies_the_grammar_mask_on_greedy_decodes(monkeypatch):
    # Request 1 may only produce token 9 (a packed mask from the step message); the others are free.
    import runner_harness

    plain_schedule = runner_harness.MiniScheduler.schedule

    def schedule(self):
        out = plain_schedule(self)
        if 1 in out.req_ids.tolist():
            mask = np.zeros(-(-ARCH["vocab_size"] // 32), np.int32)
            mask[0] = 1 << 9
            out.grammar_req_ids, out.grammar_bitmask = np.array([1], np.int64), mask
        return out

    monkeypatch.setattr(runner_harness.MiniScheduler, "schedule", schedule)
    model = _model()
    ref, _ = greedy(ModelRunner, model, ARCH, _prompts(), "cpu", max_new=6)
    out, runner = greedy(_graph_runner, model, ARCH, _prompts(), "cpu", max_new=6)
    assert (ref[0] == 9).all() and not (ref[1:] == 9).all()
    assert runner.graph_model.num_replays >= 5
    np.testing.assert_array_equal(out, ref)
