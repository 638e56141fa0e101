# SPDX-License-Identifier: Apache-2.0
"""The torch_npu runtime, imported lazily and behind a guard.

``load()`` returns the ``torch_npu`` module or raises ``NpuUnavailableError`` (a ValueError naming
``backend.device``) with one line saying what is missing: the torch_npu package, the CANN libraries
it links (libascendcl.so, libhccl.so, ...), or a visible NPU. ``import torch_npu`` is attempted
once per call site; Python caches a successful import, and torch_npu itself must be initialized
only once per process (vllm-ascend's note), so nothing here re-initializes it.

A CPU test double of torch_npu (tests/unit/backends/npu) marks itself with
``__mindie_cpu_double__ = True``; ``is_cpu_double()`` lets the platform place tensors on the CPU
while every op still goes through the torch_npu mapping. Imports only torch.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

__all__ = ["NpuUnavailableError", "load", "is_cpu_double", "soc_name", "TORCH_NPU_PIN"]

TORCH_NPU_PIN = "2.13.0"   # the torch_npu release matching the project's torch (pyproject [npu])


class NpuUnavailableError(ValueError):
    """``backend.device: npu`` cannot start on this machine (one line, no traceback at the CLI)."""


def _missing_library(err: BaseException) -> str | None:
    text = str(err)
    for lib in ("libascendcl", "libhccl", "libacl_op_compiler", "libge_runner", "libgraph", "libopapi",
                "libruntime"):
        if lib in text:
            return lib + ".so"
    return None


def load() -> ModuleType:
    """The torch_npu module, or NpuUnavailableError saying what is missing."""
    mod = sys.modules.get("torch_npu")
    if mod is not None:
        return mod
    if importlib.util.find_spec("torch_npu") is None:
        raise NpuUnavailableError(
            "backend.device: npu needs torch_npu, which is not installed "
            f"(on an Ascend host with CANN: pip install -e '.[npu]', which pins torch-npu=={TORCH_NPU_PIN})")
    try:
        return importlib.import_module("torch_npu")
    except (ImportError, OSError) as e:  # torch_npu is there, its CANN libraries are not
        lib = _missing_library(e)
        what = f"the CANN toolkit ({lib} not found)" if lib else f"a working torch_npu ({type(e).__name__}: " \
            f"{str(e).splitlines()[0] if str(e) else 'import failed'})"
        raise NpuUnavailableError(f"backend.device: npu needs {what}; install CANN and "
                                  "`source <CANN>/set_env.sh` before starting") from None


def require_device() -> ModuleType:
    """``load()`` plus a visible NPU."""
    tnpu = load()
    if is_cpu_double(tnpu):
        return tnpu
    if not tnpu.npu.is_available():
        raise NpuUnavailableError("backend.device: npu: torch_npu loaded but sees no NPU "
                                  "(check npu-smi and ASCEND_RT_VISIBLE_DEVICES)")
    return tnpu


def is_cpu_double(tnpu: ModuleType | None = None) -> bool:
    tnpu = tnpu if tnpu is not None else sys.modules.get("torch_npu")
    return bool(getattr(tnpu, "__mindie_cpu_double__", False))


def soc_name() -> str:
    """The SoC of device 0 ("Ascend910B3", "Ascend310P3", ...); "" when unknown."""
    try:
        return str(load().npu.get_device_name(0))
    except Exception:  # noqa: BLE001 - a name is a hint, never a failure
        return ""


def is_310p() -> bool:
    return "310P" in soc_name()
