# SPDX-License-Identifier: Apache-2.0
"""Serving with tensor parallelism, and its faults (CPU, gloo, loopback only):

- two "nodes": two ``scripts/launch/launch.py`` invocations (node_rank 0 and 1, master on
  127.0.0.1) serve the OpenAI API with the tokens of one process (the oracle: ``LLM`` at TP=1 on
  the same weights); SIGTERM to node 0 under load drains and stops every rank (exit 0 everywhere);
- a node that never joins: node 0 alone fails start-up within the join timeout, non-zero;
- ``mindie-llm serve`` at TP=2 (the second rank is its child): a worker killed mid-request, and a
  worker that hangs (SIGSTOP), each make /health fail and the server exit non-zero with one line
  naming rank 1, within the collective timeout.

No process outlives a test (each kills what it started, whatever happened).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
import yaml

from mindie_llm.loader import default_model_path

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "scripts", "launch", "launch.py")
READY = re.compile(r"mindie-llm ready: http=(\S+)")
ENV = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's vocabulary size, served with SmolLM2's tokenizer."""
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM._from_config(cfg).float().eval()
    path = tmp_path_factory.mktemp("tp_serve_model")
    hf.save_pretrained(path, safe_serialization=True)
    return str(path)


def _config(tmp, model_dir: str, **parallel) -> str:
    cfg = {"model": {"path": model_dir, "tokenizer": default_model_path(), "dtype": "float32",
                     "served_model_name": "tiny", "max_seq_len": 256},
           "cache": {"num_blocks": 128, "cache_block_size": 8},
           "scheduler": {"max_batch_size": 8, "max_prefill_tokens": 256},
           "parallel": {"tensor_parallel_size": 2, "timeout_s": 5, "join_timeout_s": 60, **parallel},
           "backend": {"device": "cpu", "num_threads": 1},
           "server": {"host": "127.0.0.1", "http_port": _port(), "grpc_port": -1, "drain_timeout_s": 20}}
    path = os.path.join(tmp, f"tp-{time.monotonic_ns()}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


class Proc:
    """A process whose output is collected on a thread (so that pipes never fill)."""

    def __init__(self, argv: list[str]):
        self.p = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line)

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: re.Pattern, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pattern.search(self.out)
            if m:
                return m
            if self.p.poll() is not None:
                raise AssertionError(f"exited {self.p.returncode} before {pattern.pattern!r}:\n{self.out[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"no {pattern.pattern!r} within {timeout:g} s:\n{self.out[-3000:]}")

    def wait(self, timeout: float) -> int:
        try:
            code = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout:g} s:\n{self.out[-3000:]}") from None
        self._t.join(5)
        return code

    def kill(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)     # the whole session: torchrun and its ranks
            except ProcessLookupError:
                pass
            self.p.wait()


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _complete(url: str, prompt: list[int], max_tokens: int = 8) -> list[int]:
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


PROMPTS = [[1, 504, 3458, 282, 4, 2017, 30], [1, 9690, 421, 1012]]


@pytest.fixture(scope="module")
def oracle(model_dir):
    from mindie_llm import LLM, SamplingParams

    llm = LLM(model=model_dir, tokenizer=default_model_path(), dtype="float32", num_blocks=128, block_size=8)
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    return [r.outputs[0].text for r in llm.generate(PROMPTS, sp, use_tqdm=False)]


def test_two_nodes_on_loopback_serve_like_one_process_and_stop_on_sigterm(tmp_path, model_dir, oracle):
    cfg = _config(str(tmp_path), model_dir, nnodes=2, master_addr="127.0.0.1", master_port=_port())
    node1 = Proc([sys.executable, LAUNCH, "--config", cfg, "--node-rank", "1"])
    node0 = Proc([sys.executable, LAUNCH, "--config", cfg, "--node-rank", "0"])
    try:
        url = node0.wait_for(READY, 120).group(1)
        assert [_complete(url, p) for p in PROMPTS] == oracle
        # SIGTERM to node 0 under load: in-flight requests finish, every rank stops, exit 0
        results: list = []
        threads = [threading.Thread(target=lambda p=p: results.append(_complete(url, p, 40))) for p in PROMPTS * 2]
        for t in threads:
            t.start()
        time.sleep(0.5)
        node0.p.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert len(results) == 4, node0.out[-2000:]
        assert node0.wait(60) == 0, node0.out[-3000:]
        assert node1.wait(60) == 0, node1.out[-3000:]
    finally:
        node0.kill()
        node1.kill()


def test_a_node_that_never_joins_fails_start_up(tmp_path, model_dir):
    cfg = _config(str(tmp_path), model_dir, nnodes=2, master_addr="127.0.0.1", master_port=_port(), join_timeout_s=3)
    node0 = Proc([sys.executable, LAUNCH, "--config", cfg, "--node-rank", "0"])
    try:
        t0 = time.monotonic()
        code = node0.wait(60)
        assert code != 0
        assert time.monotonic() - t0 < 45
        assert "launch: node 0: torchrun exited with code" in node0.out, node0.out[-2000:]
        assert "not every node joined the rendezvous" in node0.out
    finally:
        node0.kill()


def _serve_tp2(tmp_path, model_dir) -> tuple[Proc, str, int]:
    cfg = _config(str(tmp_path), model_dir, timeout_s=3)
    srv = Proc([sys.executable, "-m", "mindie_llm.server.launcher", "--config", cfg])
    try:
        url = srv.wait_for(READY, 120).group(1)
        workers = _children(srv.p.pid)
        assert len(workers) == 1, workers
    except BaseException:
        for pid in _children(srv.p.pid):
            os.kill(pid, signal.SIGKILL)
        srv.kill()
        raise
    return srv, url, workers[0]


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_worker_fault_fails_health_and_exits_naming_the_rank(tmp_path, model_dir, fault):
    srv, url, worker = _serve_tp2(tmp_path, model_dir)
    try:
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        t = threading.Thread(target=lambda: httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": PROMPTS[0], "max_tokens": 200, "ignore_eos": True}), daemon=True)
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        os.kill(worker, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        code = srv.wait(40)
        took = time.monotonic() - t0
        assert code != 0, srv.out[-2000:]
        assert took < 30, took
        errors = [ln for ln in srv.out.splitlines() if ln.startswith("mindie-llm: error:")]
        assert len(errors) == 1 and "tensor-parallel rank 1" in errors[0], srv.out[-3000:]
        with pytest.raises(httpx.HTTPError):     # and /health fails from then on
            httpx.get(f"{url}/health", timeout=2)
        time.sleep(1)
        assert not _alive(worker), "the worker outlived the server"
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)
        srv.kill()
