# SPDX-License-Identifier: Apache-2.0
"""The ``torch.distributed`` point-to-point KV connector, for instances that joined one transfer
group at start-up (gloo on the CPU; the payload over NCCL/HCCL with device tensors).

Layer by layer, each layer is three messages from the sender's rank to the receiver's rank::

    header  int64[12]  MAGIC, req_id, layer, nblocks, dtype code, shape[5], nbytes, seq   (control)
    ids     int64[nblocks]                  (posted only after nblocks is checked against the pool)
    payload uint8[nbytes]                   (data group; posted only after nbytes is checked;
                                             written after every header field agreed with the
                                             request's blocks)

The header and the ids are host tensors on the transfer group's gloo *control* group (a receiver
thread takes headers from any rank: ``recv_anysource``, which NCCL does not have, and no device
receive waits idle for a transfer that may never come: NCCL's watchdog would end the process). The
payload goes over the *data* group: the same gloo group (a device pool is staged through host
memory) or an NCCL/HCCL group between the same ranks (device tensors, GPU to GPU; a receive is
posted only once its header arrived, so it completes within the transfer). A frame that disagrees
with the pool is refused with a logged reason and its payload is received into a scratch buffer
and dropped, so that the sender's stream stays in step; a frame whose sizes exceed the pool
cannot be skipped: that peer's stream is declared broken and its transfers fail. Group membership
is the authentication here (the members were admitted by the rendezvous at start-up); across
untrusted links use ``tcp``. NCCL refuses two members on one GPU ("Duplicate GPU detected"):
instances sharing a card use the gloo data group.

The transfer group is a process group of its own (``make_transfer_group``: a TCPStore rendezvous,
a gloo group object and, for NCCL/HCCL, a device group object on the same store), not
torch.distributed's default group, so that it coexists with the tensor-parallel group of each
instance. Owns the messages on that group. Must not import the engine, the scheduler or the server.
"""
from __future__ import annotations

import datetime
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mindie_llm.distributed.kv_transfer.base import DTYPE_CODES, KVConnector, TransferRefused, TransferResult

__all__ = ["P2PConnector", "TransferGroup", "make_transfer_group"]

logger = logging.getLogger(__name__)

MAGIC = 0x4D4B5650      # "MKVP"
_HDR = 12
_TAG = 0x4B56
# how long the receiver waits for the next header: an idle decode instance waits for its next
# transfer however long that takes (the group's own timeout, 120 s, would end the receiver)
_IDLE_WAIT = datetime.timedelta(days=30)


@dataclass
class TransferGroup:
    """The transfer group's two process-group objects: ``control`` (gloo: headers and ids) and
    ``data`` (the payload: the control group itself for gloo, else an NCCL/HCCL group)."""

    control: Any
    data: Any
    backend: str            # of the data group: gloo | nccl | hccl

    def rank(self) -> int:
        return self.control.rank()

    def size(self) -> int:
        return self.control.size()


def make_transfer_group(address: str, rank: int, size: int, timeout_s: float = 120.0,
                        backend: str = "gloo") -> TransferGroup:
    """Joins the transfer group of ``size`` members at ``address`` (host:port; rank 0 hosts the
    store); blocks until every member has joined or ``timeout_s`` passed. ``backend`` is the data
    group's (gloo | nccl | hccl); the control group is always gloo."""
    from mindie_llm.distributed.comm_env import apply_comm_env

    host, _, port = address.rpartition(":")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, int(port), size, is_master=(rank == 0), timeout=timeout)
    control = dist.ProcessGroupGloo(dist.PrefixStore("ctl/", store), rank, size, timeout)
    if backend == "gloo":
        return TransferGroup(control, control, "gloo")
    apply_comm_env()                        # multicast off before the device communicator exists
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        data = dist.ProcessGroupNCCL(dist.PrefixStore("nccl/", store), rank, size, opts)
    elif backend == "hccl":
        import torch_npu  # noqa: F401 - registers ProcessGroupHCCL

        data = torch.distributed.ProcessGroupHCCL(dist.PrefixStore("hccl/", store), rank, size, timeout)
    else:
        raise ValueError(f"disaggregation.transfer_backend: must be gloo, nccl or hccl; got {backend!r}")
    return TransferGroup(control, data, backend)


class P2PConnector(KVConnector):
    """``group``: the transfer group (``make_transfer_group``) both instances belong to (a bare
    gloo group object is taken as control and data group at once)."""

    name = "p2p"

    def __init__(self, kv_caches: list[torch.Tensor], *, group: Any, receive: bool = True) -> None:
        super().__init__(kv_caches)
        if not isinstance(group, TransferGroup):
            group = TransferGroup(group, group, "gloo")
        self.group = group
        self.rank = group.rank()
        self._send_lock = threading.Lock()
        self._seq_out: dict[int, int] = {}
        self._seq_in: dict[int, int] = {}
        self._broken: set[int] = set()
        self._device = kv_caches[0].device
        # where the payload travels: the pool's device over NCCL/HCCL, host memory over gloo
        self._wire_device = self._device if group.backend != "gloo" else torch.device("cpu")
        if group.backend != "gloo" and self._device.type == "cpu":
            raise ValueError(f"disaggregation.transfer_backend: {group.backend} needs a device KV pool; "
                             "this one is on the CPU (use gloo)")
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
        ctl, data = self.group.control, self.group.data
        try:
            with self._send_lock:           # one sender at a time keeps each peer's stream in order
                for layer, cache in enumerate(self.kv_caches):
                    payload = cache.index_select(1, idx).contiguous().view(torch.uint8).reshape(-1)
                    payload = payload.to(self._wire_device)                  # [nbytes] uint8
                    seq = self._seq_out.get(to, 0) + 1
                    self._seq_out[to] = seq
                    hdr = torch.tensor([MAGIC, req_id, layer, dst.numel(), code, 2, src.size, self.layout.block_size,
                                        self.layout.num_kv_heads, self.layout.head_dim, payload.numel(), seq],
                                       dtype=torch.int64)
                    for g, t in ((ctl, hdr), (ctl, dst), (data, payload)):
                        remaining = datetime.timedelta(seconds=max(t0 + timeout_s - time.monotonic(), 0.01))
                        g.send([t], to, _TAG).wait(remaining)
                    sent += payload.numel()
        except RuntimeError as e:           # gloo/NCCL report timeouts and lost peers as RuntimeError
            return TransferResult(req_id, False, f"send failed: {str(e).splitlines()[0]}", sent, time.monotonic() - t0)
        self.bytes_sent += sent
        return TransferResult(req_id, True, "", sent, time.monotonic() - t0)

    # ------------------------------------------------------------------ receiving
    def _recv_loop(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        ctl, data = self.group.control, self.group.data
        hdr = torch.zeros(_HDR, dtype=torch.int64)
        max_bytes = self.layout.frame_bytes(self.layout.num_blocks - 1)
        while not self._stopped.is_set():
            try:
                work = ctl.recv_anysource([hdr], _TAG)    # from any rank
                work.wait(_IDLE_WAIT)
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
            ctl.recv([ids], src, _TAG).wait()
            payload = torch.empty(nbytes, dtype=torch.uint8, device=self._wire_device)
            data.recv([payload], src, _TAG).wait()      # bounded by the pool: safe to consume
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
