# SPDX-License-Identifier: Apache-2.0
"""NpuPlatform: start-up without CANN fails with one line and exit code 2 through the CLI (no
traceback), the config checks (dtype, block size), KV sizing from NPU memory after a profiled
step (numbers from the double's device), device placement and op registration under the double."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mindie_llm import ops
from mindie_llm.config import EngineConfig

REPO = Path(__file__).resolve().parents[4]


GENERATE = ["generate", "hi", "--max-tokens", "1"]
SERVE = ["serve", "--set", "server.http_port=0", "--set", "server.grpc_port=0"]


def _cli(extra_path: str | None = None, command: list[str] = GENERATE) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    paths = [str(REPO / "python")] + ([extra_path] if extra_path else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "mindie_llm.cli", *command, "--set", "backend.device=npu"],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(__import__("importlib").util.find_spec("torch_npu") is not None, reason="torch_npu is installed")
def test_cli_without_torch_npu_is_one_line_exit_2():
    r = _cli()
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("mindie-llm: error: backend.device: npu needs torch_npu") and "[npu]" in lines[0]
    r = _cli(command=SERVE)        # the server launcher reports a model-load failure (its exit code 4)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 4 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "backend.device: npu needs torch_npu" in lines[0]


def test_cli_with_torch_npu_but_no_cann_names_the_library(tmp_path):
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()   # what the real wheel does without CANN: its _C cannot load libhccl / libascendcl
    (pkg / "__init__.py").write_text("raise ImportError('libascendcl.so: cannot open shared object file: "
                                     "No such file or directory')\n")
    r = _cli(str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "the CANN toolkit (libascendcl.so not found)" in lines[0], r.stderr


def test_device_and_registration_under_the_double(npu_double):
    from mindie_llm.backends import get_platform
    from mindie_llm.backends.npu.graph import NPUGraphDecodeModel

    p = get_platform("npu")
    assert p.device_type == "npu" and p.dist_backend == "hccl" and p.dispatch_key == "PrivateUse1"
    assert p.device() == torch.device("cpu") and p.default_dtype() == torch.bfloat16
    assert p.graph_wrapper_cls() is NPUGraphDecodeModel
    table = ops.registered_backends()["cpu"]
    assert table.paged_attention.__module__ == "mindie_llm.backends.npu.attention"


def _cfg(**kw) -> EngineConfig:
    return EngineConfig.from_kwargs(device="npu", **kw)


def test_config_checks(npu_double):
    from mindie_llm.backends.npu.platform import NpuPlatform

    assert NpuPlatform.check_and_update_config(_cfg(block_size=128)).model.dtype == "bfloat16"
    assert NpuPlatform.check_and_update_config(_cfg(block_size=128, dtype="float16")).model.dtype == "float16"
    for kw, key in ((dict(block_size=128, dtype="float32"), "model.dtype"),
                    (dict(block_size=16, dtype="float16"), "cache.cache_block_size"),
                    (dict(block_size=128, dtype="float16", **{"cache.cache_dtype": "bfloat16"}), "cache.cache_dtype")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            NpuPlatform.check_and_update_config(_cfg(**kw))
    npu_double.soc = "Ascend310P3"   # no bfloat16 on 310P
    assert NpuPlatform.check_and_update_config(_cfg(block_size=128)).model.dtype == "float16"
    with pytest.raises(ValueError, match="310P"):
        NpuPlatform.check_and_update_config(_cfg(block_size=128, dtype="bfloat16"))


def test_kv_sizing_after_profiled_step(npu_double):
    from mindie_llm.backends.npu.platform import NpuPlatform
    from mindie_llm.config import CacheConfig

    gib = 1 << 30
    npu_double.total_memory, npu_double.in_use, npu_double.peak = 64 * gib, 10 * gib, 3 * gib
    try:
        NpuPlatform.activation_peak_bytes = None
        cc = CacheConfig(cache_block_size=128, gpu_memory_utilization=0.8)
        # not profiled yet: reserve max(2 GiB, 4 % of the device)
        assert NpuPlatform.available_kv_cache_bytes(cc) == int(64 * gib * 0.8) - 10 * gib - int(0.04 * 64 * gib)
        ran = []
        assert NpuPlatform.profile_activation_peak(lambda: ran.append(1)) == 3 * gib and ran == [1]
        assert NpuPlatform.available_kv_cache_bytes(cc) == int(64 * gib * 0.8) - 10 * gib - 3 * gib
        per_block = 2 * 30 * 128 * 3 * 64 * 2
        assert NpuPlatform.num_kv_blocks(cc, per_block) == (int(64 * gib * 0.8) - 13 * gib) // per_block
        npu_double.in_use = 60 * gib
        with pytest.raises(ValueError, match="gpu_memory_utilization"):
            NpuPlatform.available_kv_cache_bytes(cc)
    finally:
        NpuPlatform.activation_peak_bytes = None
