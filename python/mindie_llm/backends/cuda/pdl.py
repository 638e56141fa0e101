# SPDX-License-Identifier: Apache-2.0
"""Programmatic dependent launch (Hopper and later): whether this process can use it.

A kernel launched with ``launch_pdl=True`` may start while the kernel before it in the stream is
still running, once every program of that kernel has called ``gdc_launch_dependents`` (or ended);
it must call ``gdc_wait`` before it reads anything the earlier kernel wrote or writes anything the
earlier kernel reads. The one-row GEMV uses it to stream its first weight chunk during the tail
of the small kernel before it (norm, attention, activation); those small kernels are launched so
too, triggering and then waiting at their very start (so that they touch memory only after the
kernel before them has finished) -- their launch overlaps the GEMV's tail instead of following it.

Imports torch and triton only; nothing here holds per-process state beyond a cached fact about
the installed Triton and the device.
"""
from __future__ import annotations

import functools
import os

import torch

__all__ = ["supported", "launch_kwargs"]


@functools.lru_cache(maxsize=None)
def _triton_has_gdc() -> bool:
    try:
        import triton.language as tl
        return hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")
    except Exception:   # an older Triton without the extra.cuda module
        return False


def supported(device: torch.device | str | None = None) -> bool:
    """True on a Hopper-or-later GPU with a Triton that has the grid-dependency ops, outside the
    Triton interpreter (which has neither launches nor grids to overlap). Cheap: called per launch."""
    if device is None:
        index = None
    else:
        dev = device if isinstance(device, torch.device) else torch.device(device)
        if dev.type != "cuda":
            return False
        index = dev.index
    return _supported(index)


@functools.lru_cache(maxsize=None)
def _supported(index: int | None) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return False
    dev = torch.device("cuda", torch.cuda.current_device() if index is None else index)
    return torch.cuda.get_device_capability(dev)[0] >= 9 and _triton_has_gdc()


def launch_kwargs(device: torch.device | str | None) -> dict:
    """Keyword arguments for a kernel with a ``USE_PDL`` constexpr that triggers its dependents and
    waits for the kernel before at its start: a programmatic-dependent launch where supported."""
    return {"USE_PDL": True, "launch_pdl": True} if supported(device) else {"USE_PDL": False}
