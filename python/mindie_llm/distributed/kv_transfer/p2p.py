# SPDX-License-Identifier: Apache-2.0
"""The ``torch.distributed`` point-to-point KV connector, for instances that joined one transfer
group at start-up (gloo on the CPU; the same code runs on NCCL/HCCL groups with device tensors).

Layer by layer, each layer is three messages from the sender's rank to the receiver's rank::

    header  int64[12]  MAGIC, req_id, layer, nblocks, dtype code, shape[5], nbytes, seq
    ids     int64[nblocks]                  (posted only after nblocks is checked against the pool)
    payload uint8[nbytes]                   (posted only after nbytes is checked; written after
                                             every header field agreed with the request's blocks)

A receiver thread takes headers from any rank. A frame that disagrees with the pool is refused
with a logged reason and its payload is received into a scratch buffer and dropped, so that the
sender's stream stays in step; a frame whose sizes exceed the pool cannot be skipped: that peer's
stream is declared broken and its transfers fail. Group membership is the authentication here
(the members were admitted by the rendezvous at start-up); across untrusted links use ``tcp``.

The transfer group is a process group of its own (``make_transfer_group``: a TCPStore rendezvous
and a gloo group object), not torch.distributed's default group, so that it coexists with the
tensor-parallel group of each instance. Owns the messages on that group. Must not import the
engine, the scheduler or the server.
"""
from __future__ import annotations

import datetime
import logging
import threading
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mindie_llm.distributed.kv_transfer.base import DTYPE_CODES, KVConnector, TransferRefused, TransferResult

__all__ = ["P2PConnector", "make_transfer_group"]

logger = logging.getLogger(__name__)

MAGIC = 0x4D4B5650      # "MKVP"
_HDR = 12
_TAG = 0x4B56


def make_transfer_group(address: str, rank: int, size: int, timeout_s: float = 120.0) -> Any:
    """Joins the transfer group of ``size`` members at ``address`` (host:port; rank 0 hosts the
    store); blocks until every member has joined or ``timeout_s`` passed."""
    host, _, port = address.rpartition(":")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, int(port), size, is_master=(rank == 0), timeout=timeout)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


class P2PConnector(KVConnector):
    """``group``: the transfer group (``make_transfer_group``) both instances belong to."""

    name = "p2p"

    def __init__(self, kv_caches: list[torch.Tensor], *, group: Any, receive: bool = True) -> None:
        super().__init__(kv_caches)
        self.group = group
        self.rank = group.rank()
        self._send_lock = threading.Lock()
        self._seq_out: dict[int, int] = {}
        self._seq_in: dict[int, int] = {}
        self._broken: set[int] = set()
        self._device = kv_caches[0].device
        if receive:
            threading.Thread(target=self._recv_loop, name="kv-p2p-recv", daemon=True).start()

    @property
    def address(self) -> str:
        return str(self.rank)

    # ------------------------------------------------------------------ sending
    def send(self, req_id: int, src_block_ids: np.ndarray, peer: str, dst_block_ids: np.ndarray, *,
             timeout_s: float) -> TransferResult:
        t0 = time.monotonic()
        src = np.asarray(src_block_ids, dtype=np.int64).reshape(-1)
        dst = torch.from_numpy(np.asarray(dst_block_ids, dtype=np.int64).reshape(-1).copy())
        try:
            self.layout.check_block_ids(src)
            to = int(peer)
        except ValueError as e:
            return TransferResult(req_id, False, f"bad transfer arguments: {e}")
        if src.size != dst.numel():
            return TransferResult(req_id, False, f"{src.size} source blocks but {dst.numel()} destination blocks")
        idx = torch.from_numpy(src).to(self._device)
        code = DTYPE_CODES[self.layout.dtype]
        sent = 0
        try:
            with self._send_lock:           # one sender at a time keeps each peer's stream in order
                for layer, cache in enumerate(self.kv_caches):
                    payload = cache.index_select(1, idx).contiguous().view(torch.uint8).reshape(-1)
                    seq = self._seq_out.get(to, 0) + 1
                    self._seq_out[to] = seq
                    hdr = torch.tensor([MAGIC, req_id, layer, dst.numel(), code, 2, src.size, self.layout.block_size,
                                        self.layout.num_kv_heads, self.layout.head_dim, payload.numel(), seq],
                                       dtype=torch.int64)
                    remaining = datetime.timedelta(seconds=max(t0 + timeout_s - time.monotonic(), 0.01))
                    for t in (hdr, dst, payload):
                        self.group.send([t.to(self._device)], to, _TAG).wait(remaining)
                    sent += payload.numel()
        except RuntimeError as e:           # gloo reports timeouts and lost peers as RuntimeError
            return TransferResult(req_id, False, f"send failed: {str(e).splitlines()[0]}", sent, time.monotonic() - t0)
        self.bytes_sent += sent
        return TransferResult(req_id, True, "", sent, time.monotonic() - t0)

    # ------------------------------------------------------------------ receiving
    def _recv_loop(self) -> None:
        hdr = torch.zeros(_HDR, dtype=torch.int64)
        max_bytes = self.layout.frame_bytes(self.layout.num_blocks - 1)
        while not self._stopped.is_set():
            try:
                work = self.group.recv_anysource([hdr], _TAG)    # from any rank
                work.wait()
                src = work.source_rank()
            except RuntimeError as e:
                if self._stopped.is_set():
                    return
                logger.warning("kv transfer (p2p): receive failed: %s", str(e).splitlines()[0])
                self.close()
                return
            h = hdr.tolist()
            req_id, layer, nblocks, code, shape, nbytes, seq = h[1], h[2], h[3], h[4], tuple(h[5:10]), h[10], h[11]
            if h[0] != MAGIC or not 1 <= nblocks < self.layout.num_blocks or not 0 <= nbytes <= max_bytes:
                self._refuse("stream", f"rank {src}: header out of bounds (magic {h[0]:#x}, {nblocks} blocks, "
                             f"{nbytes} bytes): this peer's stream is broken")
                self._broken.add(src)
                continue
            ids = torch.zeros(nblocks, dtype=torch.int64)
            self.group.recv([ids], src, _TAG).wait()
            payload = torch.empty(nbytes, dtype=torch.uint8)
            self.group.recv([payload], src, _TAG).wait()    # bounded by the pool: safe to consume
            expected_seq = self._seq_in.get(src, 0) + 1
            self._seq_in[src] = max(expected_seq, seq)
            try:
                if src in self._broken:
                    raise self._refuse("stream", f"rank {src}: stream was broken earlier")
                if seq != expected_seq:
                    raise self._refuse("replay", f"rank {src}: frame seq {seq} where {expected_seq} was next")
                p = self._check_frame(req_id, layer, ids.numpy(), code, shape, nbytes)
            except TransferRefused as e:
                if req_id in self._pending and e.reason.startswith(f"request {req_id}"):
                    self._fail(req_id, e.reason)
                continue
            if self._write_layer(p, layer, payload.view(self.layout.dtype).view(shape)):
                self._finish_if_complete(p)
