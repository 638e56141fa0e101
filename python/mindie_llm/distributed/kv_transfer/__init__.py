# SPDX-License-Identifier: Apache-2.0
"""The KV transfer plane of prefill/decode disaggregation: one connector interface (``base``), a
byte-stream connector over TCP/TLS with an authenticated fixed binary frame (``tcp``, ``frame``)
and a ``torch.distributed`` point-to-point connector for instances that share a process group
(``p2p``). ``secret_from_env`` reads the shared key. Must not import the engine or the server."""
from __future__ import annotations

import os

from mindie_llm.distributed.kv_transfer.base import KVConnector, KVLayout, TransferRefused, TransferResult

__all__ = ["KVConnector", "KVLayout", "TransferRefused", "TransferResult", "secret_from_env"]

MIN_SECRET_BYTES = 16


def secret_from_env(var: str) -> bytes:
    """The shared transfer secret from environment variable ``var``; ValueError naming it if it is
    missing or shorter than 16 bytes."""
    value = os.environ.get(var, "")
    if len(value.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"environment variable {var} must hold the KV transfer secret "
                         f"(at least {MIN_SECRET_BYTES} bytes); it is {'unset' if not value else 'too short'}")
    return value.encode()
