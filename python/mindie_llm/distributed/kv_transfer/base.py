# SPDX-License-Identifier: Apache-2.0
"""The KV connector interface: move the KV blocks of one request from a prefill instance's pool
into a decode instance's pool (after vLLM's KV connector and MindIE's LLM-DataDist).

    sender (prefill)    send(req_id, src_block_ids, peer, dst_block_ids, timeout_s) -> TransferResult
    receiver (decode)   expect(req_id, dst_block_ids, timeout_s) -> Future[TransferResult]
                        cancel(req_id)      # after it returns, nothing more is written for req_id

A transfer moves one frame per layer: ``kv_caches[layer][:, block_ids]``, shape
``[2, n, block_size, num_kv_heads, head_dim]``. The receiver accepts a frame only for a request it
``expect``-s, only into exactly the block ids it announced, only once per layer, and only with the
shape and dtype of its own pool (``KVLayout``); anything else is refused with a logged reason and
writes nothing. A transfer that does not finish by its deadline fails on both sides, so that both
instances can free the blocks.

Owns the layout check and the receiving bookkeeping shared by every connector. Must not import the
engine, the scheduler or the server.
"""
from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["KVLayout", "TransferResult", "TransferRefused", "KVConnector", "DTYPE_CODES"]

logger = logging.getLogger(__name__)

# dtype <-> one-byte wire code (fixed; never derived from the wire).
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.int8: 4,
                                       torch.uint8: 5}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


@dataclass(frozen=True)
class KVLayout:
    """Shape of one instance's paged KV pool: ``num_layers`` tensors of
    ``[2, num_blocks, block_size, num_kv_heads, head_dim]``."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, kv_caches: list[torch.Tensor]) -> "KVLayout":
        assert kv_caches, "no KV cache layers"
        two, nb, bs, h, d = kv_caches[0].shape
        assert two == 2 and all(c.shape == kv_caches[0].shape and c.dtype == kv_caches[0].dtype for c in kv_caches)
        return cls(len(kv_caches), int(nb), int(bs), int(h), int(d), kv_caches[0].dtype)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def frame_shape(self, n: int) -> tuple[int, int, int, int, int]:
        """Shape of one layer's payload for ``n`` blocks."""
        return (2, n, self.block_size, self.num_kv_heads, self.head_dim)

    def frame_bytes(self, n: int) -> int:
        return 2 * n * self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    def check_block_ids(self, block_ids: np.ndarray) -> None:
        """Raises ValueError unless ``block_ids`` are distinct ids of allocatable blocks (1..num_blocks-1)."""
        if block_ids.ndim != 1 or block_ids.size == 0:
            raise ValueError("block ids must be a non-empty 1-D list")
        if int(block_ids.min()) < 1 or int(block_ids.max()) >= self.num_blocks:
            raise ValueError(f"block ids outside [1, {self.num_blocks})")
        if np.unique(block_ids).size != block_ids.size:
            raise ValueError("block ids repeat")


@dataclass
class TransferResult:
    """The outcome of one request's transfer (either side)."""

    req_id: int
    ok: bool
    reason: str = ""
    num_bytes: int = 0
    seconds: float = 0.0


class TransferRefused(Exception):
    """A frame or a connection was refused; ``reason`` is what gets logged and sent back."""

    def __init__(self, reason: str, req_id: int | None = None):
        self.reason = reason
        self.req_id = req_id
        super().__init__(reason)


@dataclass
class _Pending:
    req_id: int
    block_ids: np.ndarray                  # [n] int64, the receiver's own blocks
    deadline: float                        # time.monotonic()
    future: Future
    layers_done: np.ndarray                # [L] bool
    started: float = field(default_factory=time.monotonic)
    num_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False                   # set under ``lock``: no more writes


class KVConnector(ABC):
    """One instance's end of the transfer plane. ``kv_caches`` are the instance's own pool (the
    receiver writes only into blocks it ``expect``-s; the sender only reads)."""

    name = "abstract"

    def __init__(self, kv_caches: list[torch.Tensor]) -> None:
        self.kv_caches = kv_caches
        self.layout = KVLayout.of(kv_caches)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.refusals: dict[str, int] = {}     # reason kind -> count (metrics)
        self.bytes_received = 0
        self.bytes_sent = 0
        self._watchdog = threading.Thread(target=self._watch, name=f"kv-{self.name}-watchdog", daemon=True)
        self._watchdog.start()

    # ------------------------------------------------------------------ the interface
    @property
    @abstractmethod
    def address(self) -> str:
        """Where peers send to (connector-specific: ``host:port`` or ``rank``)."""

    @abstractmethod
    def send(self, req_id: int, src_block_ids: np.ndarray, peer: str, dst_block_ids: np.ndarray, *,
             timeout_s: float) -> TransferResult:
        """Sends the KV of ``src_block_ids`` (this pool) into the peer's ``dst_block_ids``, layer by
        layer; blocks until the peer confirmed or the deadline passed. Never raises for a failed
        transfer: the result says why."""

    def expect(self, req_id: int, block_ids: np.ndarray, *, timeout_s: float) -> Future:
        """Announces that ``req_id``'s KV will arrive into ``block_ids``; the future resolves to a
        TransferResult (ok once every layer landed; failed on refusal, cancel or timeout)."""
        ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
        self.layout.check_block_ids(ids)
        fut: Future = Future()
        p = _Pending(req_id, ids, time.monotonic() + timeout_s, fut, np.zeros(self.layout.num_layers, bool))
        with self._lock:
            if req_id in self._pending:
                raise ValueError(f"request {req_id} is already expected")
            self._pending[req_id] = p
        return fut

    def cancel(self, req_id: int, reason: str = "cancelled") -> None:
        """Stops receiving for ``req_id``; once this returns no write for it can happen."""
        with self._lock:
            p = self._pending.pop(req_id, None)
        if p is not None:
            self._close(p, False, reason)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self._stopped.set()
        with self._lock:
            items = list(self._pending.values())
            self._pending.clear()
        for p in items:
            self._close(p, False, "connector closed")

    # ------------------------------------------------------------------ receiving helpers
    def _refuse(self, kind: str, reason: str) -> TransferRefused:
        self.refusals[kind] = self.refusals.get(kind, 0) + 1
        logger.warning("kv transfer (%s): refused: %s", self.name, reason)
        return TransferRefused(reason)

    def _check_frame(self, req_id: int, layer: int, block_ids: np.ndarray, dtype_code: int,
                     shape: tuple[int, ...], nbytes: int) -> _Pending:
        """Validates one layer frame's header against this pool and the request's announcement;
        raises TransferRefused (nothing written) or returns the pending request."""
        lay = self.layout
        p = self._pending.get(req_id)
        if p is None:
            raise self._refuse("unknown_request", f"frame for unknown request {req_id}")
        if not 0 <= layer < lay.num_layers:
            raise self._refuse("layer", f"request {req_id}: layer {layer} outside [0, {lay.num_layers})")
        if block_ids.shape != p.block_ids.shape or not np.array_equal(block_ids, p.block_ids):
            raise self._refuse("block_ids", f"request {req_id}: block ids differ from the {p.block_ids.size} "
                               "announced for it")
        if CODE_DTYPES.get(dtype_code) != lay.dtype:
            raise self._refuse("dtype", f"request {req_id}: dtype code {dtype_code} is not this pool's {lay.dtype}")
        if tuple(shape) != lay.frame_shape(p.block_ids.size):
            raise self._refuse("shape", f"request {req_id}: shape {tuple(shape)} is not "
                               f"{lay.frame_shape(p.block_ids.size)}")
        if nbytes != lay.frame_bytes(p.block_ids.size):
            raise self._refuse("byte_count", f"request {req_id}: byte count {nbytes} is not "
                               f"{lay.frame_bytes(p.block_ids.size)}")
        if p.layers_done[layer]:
            raise self._refuse("replay", f"request {req_id}: layer {layer} already received (replayed frame)")
        return p

    def _write_layer(self, p: _Pending, layer: int, payload: torch.Tensor) -> bool:
        """Copies a validated payload ``[2, n, bs, H, D]`` into the request's blocks of ``layer``.
        False (nothing written) if the request was cancelled or timed out meanwhile."""
        with p.lock:
            if p.closed or p.layers_done[layer]:
                return False
            idx = torch.from_numpy(p.block_ids).to(self.kv_caches[layer].device)
            self.kv_caches[layer].index_copy_(1, idx, payload.to(self.kv_caches[layer].device))
            p.layers_done[layer] = True
            p.num_bytes += payload.numel() * payload.element_size()
            self.bytes_received += payload.numel() * payload.element_size()
            return True

    def _finish_if_complete(self, p: _Pending) -> bool:
        if not p.layers_done.all():
            return False
        with self._lock:
            if self._pending.get(p.req_id) is p:
                del self._pending[p.req_id]
        self._close(p, True, "")
        return True

    def _fail(self, req_id: int, reason: str) -> None:
        with self._lock:
            p = self._pending.pop(req_id, None)
        if p is not None:
            self._close(p, False, reason)

    def _close(self, p: _Pending, ok: bool, reason: str) -> None:
        with p.lock:
            if p.closed:
                return
            p.closed = True
        if not ok:
            logger.warning("kv transfer (%s): request %d failed: %s", self.name, p.req_id, reason)
        if not p.future.done():
            p.future.set_result(TransferResult(p.req_id, ok, reason, p.num_bytes, time.monotonic() - p.started))

    def _watch(self) -> None:
        while not self._stopped.wait(0.05):
            now = time.monotonic()
            with self._lock:
                late = [p for p in self._pending.values() if p.deadline <= now]
                for p in late:
                    del self._pending[p.req_id]
            for p in late:
                self._close(p, False, f"timed out after {now - p.started:.1f}s "
                            f"({int(p.layers_done.sum())}/{p.layers_done.size} layers received)")
