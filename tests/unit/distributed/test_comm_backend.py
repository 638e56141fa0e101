# SPDX-License-Identifier: Apache-2.0
"""What the distributed code decides before a device is touched, checked on the CPU: the
process-group backend (``parallel.comm_backend``, ``disaggregation.transfer_backend``: auto, or a
library the device has; refused with the key named otherwise), which device each rank gets and how
ranks sharing a card split its memory fraction, the CUDA KV-cache budget of one process among
several on a card (against the rule written out by hand), graph capture only on stream-ordered
groups, the decode-only micro-batch split without a device read, and the environment every
launcher and the tensor-parallel executor give their children (NVLink multicast off; the
children's environment as captured from a stand-in ``Popen`` is the oracle)."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mindie_llm.config import ConfigError, EngineConfig
from mindie_llm.distributed.comm_env import MULTICAST_OFF, apply_comm_env, with_comm_env
from mindie_llm.distributed.parallel_state import ParallelContext, resolve_backend

ROOT = Path(__file__).resolve().parents[3]


def _script(name: str, rel: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------- backend choice
def test_resolve_backend():
    assert resolve_backend("auto", "cuda", "nccl") == "nccl"
    assert resolve_backend("auto", "cpu", "gloo") == "gloo"
    assert resolve_backend("gloo", "cuda", "nccl") == "gloo"        # ranks sharing a card
    assert resolve_backend("nccl", "cuda", "nccl") == "nccl"
    with pytest.raises(ValueError, match="parallel.comm_backend: nccl needs backend.device=cuda"):
        resolve_backend("nccl", "cpu", "gloo")
    with pytest.raises(ValueError, match="disaggregation.transfer_backend: hccl needs backend.device=npu"):
        resolve_backend("hccl", "cuda", "nccl", key="disaggregation.transfer_backend")
    with pytest.raises(ValueError, match="parallel.comm_backend: must be one of"):
        resolve_backend("mpi", "cpu", "gloo")


def test_backend_keys_in_the_config():
    cfg = EngineConfig.from_dict({"parallel": {"comm_backend": "gloo"},
                                  "disaggregation": {"transfer_backend": "nccl"}})
    assert (cfg.parallel.comm_backend, cfg.disaggregation.transfer_backend) == ("gloo", "nccl")
    assert EngineConfig().parallel.comm_backend == "auto" == EngineConfig().disaggregation.transfer_backend
    with pytest.raises(ConfigError, match="parallel.comm_backend"):
        EngineConfig.from_dict({"parallel": {"comm_backend": "mpi"}})
    with pytest.raises(ConfigError, match="disaggregation.transfer_backend"):
        EngineConfig.from_dict({"disaggregation": {"transfer_backend": "tcp"}})


def test_the_executor_honours_comm_backend_before_spawning(monkeypatch):
    from mindie_llm.executor import multiproc_executor as mpe

    cfg = EngineConfig.from_dict({"parallel": {"tensor_parallel_size": 2, "comm_backend": "nccl"},
                                  "backend": {"device": "cpu"}})
    spawned = []
    monkeypatch.setattr(mpe.subprocess, "Popen", lambda *a, **k: spawned.append(a))
    with pytest.raises(ValueError, match="parallel.comm_backend: nccl needs backend.device=cuda"):
        mpe.MultiprocExecutor(cfg)
    assert not spawned
    assert mpe._backend(EngineConfig.from_dict({"backend": {"device": "cpu"}})) == "gloo"


def test_pd_instances_with_tensor_parallelism_are_refused():
    with pytest.raises(ConfigError, match="parallel.tensor_parallel_size: a decode instance runs one rank"):
        EngineConfig.from_dict({"parallel": {"tensor_parallel_size": 2}, "disaggregation": {"role": "decode"}})


def test_p2p_device_backend_needs_a_device_pool():
    from mindie_llm.distributed.kv_transfer.p2p import P2PConnector, TransferGroup

    class G:
        def rank(self):
            return 0

    kv = [torch.zeros(2, 4, 2, 1, 2)]
    with pytest.raises(ValueError, match="disaggregation.transfer_backend: nccl needs a device KV pool"):
        P2PConnector(kv, group=TransferGroup(G(), G(), "nccl"), receive=False)


# ------------------------------------------------------------------------------- devices and memory
def _cuda_platform(monkeypatch, count):
    from mindie_llm.backends.cuda.platform import CudaPlatform

    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    return CudaPlatform


def test_rank_devices_and_shared_cards(monkeypatch):
    from mindie_llm.backends.cpu.platform import CpuPlatform

    assert CpuPlatform.rank_device(3) == torch.device("cpu") and CpuPlatform.ranks_sharing_device(3, 4) == 1
    plat = _cuda_platform(monkeypatch, 2)
    assert [plat.rank_device(r) for r in range(2)] == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert plat.ranks_sharing_device(1, 2) == 1
    plat = _cuda_platform(monkeypatch, 1)
    assert plat.rank_device(1) == torch.device("cuda", 0)              # two ranks, one card
    assert plat.ranks_sharing_device(1, 2) == 2 and plat.ranks_sharing_device(0, 3) == 3
    assert plat.ranks_sharing_device(0, 1) == 1


def test_cuda_kv_budget_is_this_processes_share(monkeypatch):
    from mindie_llm.backends.cuda import platform as cp

    gib = 1 << 30
    total, state = 100 * gib, {}
    for name, fn in (("synchronize", lambda *a: None), ("empty_cache", lambda: None),
                     ("mem_get_info", lambda *a: (state["free"], total)), ("memory_reserved", lambda *a: state["own"])):
        monkeypatch.setattr(torch.cuda, name, fn)
    monkeypatch.setattr(cp.CudaPlatform, "activation_peak_bytes", 3 * gib)
    cc = SimpleNamespace(gpu_memory_utilization=0.4)
    # alone on the card: 40 GiB share - 10 GiB weights - the context allowance - the activation peak
    state.update(own=10 * gib, free=total - 10 * gib - gib // 2)
    assert cp.CudaPlatform.available_kv_cache_bytes(cc) == 40 * gib - 10 * gib - cp.CONTEXT_BYTES - 3 * gib
    # a second instance beside one that holds 40 GiB: the same share (the other does not shrink it)
    state.update(own=10 * gib, free=total - 10 * gib - 40 * gib - gib)
    assert cp.CudaPlatform.available_kv_cache_bytes(cc) == 40 * gib - 10 * gib - cp.CONTEXT_BYTES - 3 * gib
    # but never more than is free now
    state.update(own=10 * gib, free=20 * gib)
    assert cp.CudaPlatform.available_kv_cache_bytes(cc) == 20 * gib - 3 * gib
    state.update(own=39 * gib, free=50 * gib)
    with pytest.raises(ValueError, match="cache.gpu_memory_utilization: 0.4 leaves no room"):
        cp.CudaPlatform.available_kv_cache_bytes(cc)


def test_graph_capture_only_on_stream_ordered_groups():
    assert ParallelContext.single().graph_capturable
    assert not ParallelContext(rank=0, size=2, group=object(), backend="gloo").graph_capturable
    assert ParallelContext(rank=0, size=2, group=object(), backend="nccl").graph_capturable


# ------------------------------------------------------------------------------- micro-batch split
class _NoHost(torch.Tensor):
    def cpu(self, *a, **k):
        raise AssertionError("a decode-only batch read its split point from the device")


def test_decode_only_batch_splits_without_a_device_read():
    from mindie_llm.distributed.micro_batch import OverlappedModel
    from mindie_llm.layers.attention import AttentionMetadata

    md = AttentionMetadata.build([5, 9, 3, 7], [1, 1, 1, 1], [[1, 2], [3, 4, 5], [6], [7, 8]], 4)
    md = dataclasses.replace(md, query_start_loc=md.query_start_loc.as_subclass(_NoHost),
                             seq_lens=md.seq_lens.as_subclass(_NoHost))
    seen = []

    class M:
        def forward_micro_batches(self, parts, kv):
            seen.extend(parts)
            return [p[0].float()[:, None] for p in parts]

        def __call__(self, *a):
            raise AssertionError("not split")

    out = OverlappedModel(M())(torch.arange(4), torch.arange(4), [], md)
    assert out.shape == (4, 1) and [int(p[2].num_reqs) for p in seen] == [2, 2]
    assert all(p[2].max_seq_len == md.max_seq_len and p[2].num_decodes == 2 for p in seen)
    assert torch.equal(torch.cat([p[0] for p in seen]), torch.arange(4))


# ------------------------------------------------------------------------------- child environments
def test_with_comm_env_forces_multicast_off():
    env = with_comm_env({"NCCL_NVLS_ENABLE": "1", "KEEP": "x"}, RANK="1", TORCH_SYMM_MEM_DISABLE_MULTICAST="0")
    assert {k: env[k] for k in MULTICAST_OFF} == MULTICAST_OFF and env["KEEP"] == "x" and env["RANK"] == "1"
    mine: dict = {"NVSHMEM_DISABLE_NVLS": "0"}
    apply_comm_env(mine)
    assert mine == MULTICAST_OFF


def test_tp_executor_children_get_the_environment(monkeypatch, tmp_path):
    from mindie_llm.distributed.parallel_state import TorchrunEnv
    from mindie_llm.executor import multiproc_executor as mpe

    envs = []
    monkeypatch.setattr(mpe.subprocess, "Popen", lambda argv, env, **k: envs.append(env) or SimpleNamespace())
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    ex = mpe.MultiprocExecutor.__new__(mpe.MultiprocExecutor)
    ex._children, ex._config_file = {}, None
    ex._spawn_local_workers(EngineConfig(), TorchrunEnv(0, 3, 0, "127.0.0.1", 1234))
    os.unlink(ex._config_file)
    assert len(envs) == 2
    for rank, env in enumerate(envs, start=1):
        assert {k: env[k] for k in MULTICAST_OFF} == MULTICAST_OFF
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == (str(rank), str(rank),
                                                                                                "3", "3")


class _Proc:
    returncode = 0

    def poll(self):
        return 0

    def wait(self, *a):
        return 0

    def send_signal(self, *a):
        pass


def test_pd_launch_places_instances_and_sets_the_environment(monkeypatch, tmp_path):
    pdl = _script("pd_launch_under_test", "scripts/launch/pd_launch.py")
    cfg = {"cache": {"gpu_memory_utilization": 0.8}, "disaggregation": {
        "prefill_instances": "127.0.0.1:7001", "decode_instances": "127.0.0.1:7002,127.0.0.1:7003"}}
    plan = pdl._plan(cfg, None)
    placed = pdl.place(plan, "0,1,1", 0.8)
    by = {n: (s, e) for n, s, e in placed}
    assert by["prefill:0"][1] == {"CUDA_VISIBLE_DEVICES": "0"} and "cache.gpu_memory_utilization=0.4000" \
        not in by["prefill:0"][0]
    for name in ("decode:0", "decode:1"):               # two instances on GPU 1: half the fraction each
        assert by[name][1] == {"CUDA_VISIBLE_DEVICES": "1"} and "cache.gpu_memory_utilization=0.4000" in by[name][0]
    assert by["router"][1] == {}
    with pytest.raises(ValueError, match="--devices: one GPU index per instance"):
        pdl.place(plan, "0,1", 0.8)
    import yaml

    path = tmp_path / "pd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    envs = []
    monkeypatch.setattr(pdl.subprocess, "Popen", lambda cmd, env: envs.append((cmd, env)) or _Proc())
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    assert pdl.main(["--config", str(path), "--devices", "0,0,1"]) == 0
    assert len(envs) == 4
    for cmd, env in envs:
        assert {k: env[k] for k in MULTICAST_OFF} == MULTICAST_OFF
    assert [e.get("CUDA_VISIBLE_DEVICES") for _, e in envs] == ["0", "0", "1", None]


def test_multi_node_launcher_children_get_the_environment(monkeypatch, tmp_path):
    launch = _script("launch_under_test", "scripts/launch/launch.py")
    envs = []
    monkeypatch.setattr(launch.subprocess, "Popen", lambda cmd, env: envs.append(env) or _Proc())
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "0")
    assert launch.main(["--set", "parallel.tensor_parallel_size=2"]) == 0
    assert len(envs) == 1 and {k: envs[0][k] for k in MULTICAST_OFF} == MULTICAST_OFF
    assert "MINDIE_RANK0_PIDFILE" in envs[0]


def test_nccl_refusal_names_its_reason_and_the_way_out(monkeypatch):
    """NCCL's own text, as the H200 gave it for two ranks on one GPU, reaches the user in one line."""
    import torch.distributed as dist

    from mindie_llm.distributed import parallel_state as ps

    class Store:
        def __init__(self, *a, **k):
            pass

    monkeypatch.setattr(dist, "TCPStore", Store)
    monkeypatch.setattr(dist, "PrefixStore", lambda prefix, store: store)

    def refuse(*a, **k):
        raise RuntimeError("NCCL error in: NCCLUtils.cpp:93, invalid usage (run with NCCL_DEBUG=WARN for details), "
                           "NCCL version 2.28.9\nncclInvalidUsage: This usually reflects invalid usage of NCCL library."
                           "\nLast error:\nDuplicate GPU detected : rank 0 and rank 1 both on CUDA device 60")
    monkeypatch.setattr(dist, "init_process_group", refuse)
    with pytest.raises(RuntimeError) as e:
        ps.init_from_env("nccl", tensor_parallel_size=2, env=ps.TorchrunEnv(1, 2, 1, "127.0.0.1", 1))
    msg = str(e.value)
    assert msg.startswith("parallel: rank 1: the nccl communicator of 2 ranks could not be created")
    assert "Duplicate GPU detected : rank 0 and rank 1 both on CUDA device 60" in msg
    assert "parallel.comm_backend=gloo" in msg and "\n" not in msg
