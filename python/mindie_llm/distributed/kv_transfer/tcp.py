# SPDX-License-Identifier: Apache-2.0
"""The byte-stream KV connector: TCP (optionally TLS) between instances that share no process group.

Every instance listens (``address`` = host:port); a sender opens one connection per transfer, runs
the HMAC handshake of ``frame``, sends one LAYER frame per layer and waits for the receiver's ACK
or ERR. The receiver checks each header against its own pool and the request's announced blocks
(``KVConnector._check_frame``) before it reads the block ids or the payload, verifies the keyed
checksum before it writes, and on any refusal answers ERR with the reason, logs it, fails that
request and closes the connection; other connections and requests go on.

Owns sockets and threads of the byte stream. Must not import the engine, the scheduler or the server.
"""
from __future__ import annotations

import hmac
import logging
import socket
import ssl
import threading
import time

import numpy as np
import torch

from mindie_llm.distributed.kv_transfer import frame as F
from mindie_llm.distributed.kv_transfer.base import DTYPE_CODES, KVConnector, TransferRefused, TransferResult

__all__ = ["TcpConnector"]

logger = logging.getLogger(__name__)

_MAX_CONNECTIONS = 64


def _req_of(raw: memoryview) -> int:
    try:
        return F.unpack_header(raw).req_id
    except ValueError:
        return 0


class TcpConnector(KVConnector):
    """``secret``: the shared key (bytes, from the environment); ``server_tls`` / ``client_tls``:
    ``ssl.SSLContext`` or None; ``stall_s``: a test hook that delays each sent layer."""

    name = "tcp"

    def __init__(self, kv_caches: list[torch.Tensor], *, secret: bytes, host: str = "127.0.0.1", port: int = 0,
                 server_tls: ssl.SSLContext | None = None, client_tls: ssl.SSLContext | None = None,
                 handshake_timeout_s: float = 5.0, stall_s: float = 0.0, listen: bool = True) -> None:
        if not secret:
            raise ValueError("the KV transfer secret is empty")
        super().__init__(kv_caches)
        self._secret = bytes(secret)
        self._server_tls, self._client_tls = server_tls, client_tls
        self._hs_timeout = handshake_timeout_s
        self._stall_s = stall_s
        self._slots = threading.BoundedSemaphore(_MAX_CONNECTIONS)
        self._sock: socket.socket | None = None
        self._host = host
        if listen:
            self._sock = socket.create_server((host, port), reuse_port=False, backlog=128)
            self._sock.settimeout(0.2)
            self._port = self._sock.getsockname()[1]
            threading.Thread(target=self._accept_loop, name="kv-tcp-accept", daemon=True).start()
        else:
            self._port = 0

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    def close(self) -> None:
        super().close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ------------------------------------------------------------------ sending
    def send(self, req_id: int, src_block_ids: np.ndarray, peer: str, dst_block_ids: np.ndarray, *,
             timeout_s: float) -> TransferResult:
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        src = np.asarray(src_block_ids, dtype=np.int64).reshape(-1)
        dst = np.asarray(dst_block_ids, dtype=np.int32).reshape(-1)
        if src.size != dst.size:
            return TransferResult(req_id, False, f"{src.size} source blocks but {dst.size} destination blocks")
        try:
            self.layout.check_block_ids(src)
        except ValueError as e:
            return TransferResult(req_id, False, f"source blocks: {e}")
        host, _, port = peer.rpartition(":")
        sent = 0
        key = b""
        sock: socket.socket | None = None
        try:
            with socket.create_connection((host, int(port)), timeout=max(deadline - time.monotonic(), 0.01)) as raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock = self._client_tls.wrap_socket(raw, server_hostname=host) if self._client_tls else raw
                sock.settimeout(max(min(self._hs_timeout, deadline - time.monotonic()), 0.01))
                key = F.client_handshake(sock, self._secret)
                idx = torch.from_numpy(src)
                ids_bytes = dst.astype("<i4").tobytes()
                code = DTYPE_CODES[self.layout.dtype]
                for layer, cache in enumerate(self.kv_caches):
                    if self._stall_s:
                        time.sleep(min(self._stall_s, max(deadline - time.monotonic(), 0.0)))
                    if time.monotonic() >= deadline:
                        raise socket.timeout("deadline passed")
                    payload = cache.index_select(1, idx.to(cache.device)).contiguous()   # [2, n, bs, H, D]
                    raw_bytes = payload.view(torch.uint8).cpu().numpy()
                    h = F.Header(F.LAYER, code, layer + 1, req_id, layer, dst.size, tuple(payload.shape),
                                 raw_bytes.nbytes, flags=F.FLAG_CRC if self._client_tls else 0)
                    zero = F.pack_header(h)
                    mac = F.new_checksum(key, zero, crc=self._client_tls is not None)
                    mac.update(ids_bytes)
                    mac.update(raw_bytes)
                    sock.settimeout(max(deadline - time.monotonic(), 0.01))
                    sock.sendall(F.pack_header(h, mac.digest()) + ids_bytes)
                    sock.sendall(memoryview(raw_bytes).cast("B"))
                    sent += raw_bytes.nbytes
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                kind, reason = self._read_verdict(sock, key, req_id)
        except socket.timeout:
            return TransferResult(req_id, False, f"timed out after {time.monotonic() - t0:.1f}s", sent,
                                  time.monotonic() - t0)
        except (OSError, ValueError, TransferRefused) as e:
            reason = f"{type(e).__name__}: {e}"
            if key and isinstance(e, OSError):      # the receiver may have said why before closing
                try:
                    sock.settimeout(0.5)
                    kind, why = self._read_verdict(sock, key, req_id)
                    reason = f"refused by the receiver: {why}" if kind == F.ERR else reason
                except (OSError, ValueError, TransferRefused):
                    pass
            return TransferResult(req_id, False, reason, sent, time.monotonic() - t0)
        self.bytes_sent += sent
        ok = kind == F.ACK
        return TransferResult(req_id, ok, "" if ok else f"refused by the receiver: {reason}", sent,
                              time.monotonic() - t0)

    @staticmethod
    def _read_verdict(sock: socket.socket, key: bytes, req_id: int) -> tuple[int, str]:
        h = F.unpack_header(F.recv_exact(sock, F.HEADER.size))
        if h.kind not in (F.ACK, F.ERR) or h.nbytes > F.MAX_REASON or h.nblocks != 0:
            raise TransferRefused("malformed verdict frame")
        body = bytes(F.recv_exact(sock, h.nbytes)) if h.nbytes else b""
        mac = F.new_mac(key, F.pack_header(h))
        mac.update(body)
        if not hmac.compare_digest(mac.digest(), h.mac):
            raise TransferRefused("verdict frame checksum mismatch")
        if h.req_id != req_id:
            raise TransferRefused(f"verdict for request {h.req_id}, not {req_id}")
        return h.kind, body.decode("utf-8", "replace")

    # ------------------------------------------------------------------ receiving
    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            sock = self._sock
            if sock is None:
                return
            try:
                conn, peer = sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                logger.warning("kv transfer (tcp): refused a connection from %s: too many connections", peer)
                conn.close()
                continue
            threading.Thread(target=self._serve_conn, args=(conn, peer), name="kv-tcp-conn", daemon=True).start()

    def _serve_conn(self, conn: socket.socket, peer: tuple) -> None:
        touched: set[int] = set()
        sock: socket.socket = conn
        key = b""
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self._hs_timeout)
            if self._server_tls is not None:
                sock = self._server_tls.wrap_socket(conn, server_side=True)
            try:
                key = F.server_handshake(sock, self._secret)
            except (F.HandshakeError, ConnectionError, socket.timeout, ssl.SSLError) as e:
                self._refuse("auth", f"handshake from {peer[0]}:{peer[1]}: {e}")
                return
            seq = 0
            while not self._stopped.is_set():
                sock.settimeout(None if not self._pending else max(self._next_deadline() - time.monotonic(), 0.05))
                try:
                    raw = F.recv_exact(sock, F.HEADER.size)
                except ConnectionError as e:
                    if touched & set(self._pending):
                        raise self._refuse("truncated", f"connection from {peer[0]}: {e}") from None
                    return      # a clean close between transfers
                seq += 1
                try:
                    req_id = self._receive_frame(sock, key, raw, seq, touched, self._server_tls is not None)
                except TransferRefused as e:
                    for r in touched:       # the connection closes: what it was carrying fails
                        self._fail(r, e.reason)
                    self._reply(sock, key, e.req_id if e.req_id is not None else _req_of(raw), F.ERR, e.reason)
                    self._drain(sock)
                    return
                if req_id is not None:
                    self._reply(sock, key, req_id, F.ACK, "")
        except socket.timeout:
            for r in touched:
                self._fail(r, "timed out: the sender stalled past the transfer deadline")
        except TransferRefused as e:
            for r in touched:
                self._fail(r, e.reason)
        except (OSError, ValueError) as e:
            reason = f"connection from {peer[0]}: {type(e).__name__}: {e}"
            self._refuse("truncated" if "truncated" in str(e) else "connection", reason)
            for r in touched:
                self._fail(r, reason)
        finally:
            try:
                sock.close()
            finally:
                self._slots.release()

    def _next_deadline(self) -> float:
        with self._lock:
            return min((p.deadline for p in self._pending.values()), default=time.monotonic() + 1.0)

    def _receive_frame(self, sock: socket.socket, key: bytes, raw: memoryview, seq: int,
                       touched: set[int], is_tls: bool = False) -> int | None:
        """Reads and applies one frame; returns the request id once its last layer landed."""
        try:
            h = F.unpack_header(raw)
        except ValueError as e:
            raise self._refuse("magic", str(e)) from None
        if h.seq != seq:
            raise self._refuse("replay", f"frame seq {h.seq} where {seq} was next (replayed or reordered frame)")
        if h.kind != F.LAYER:
            raise self._refuse("kind", f"unexpected frame kind {h.kind}")
        with self._lock:
            known = h.req_id in self._pending
        if not known:
            e = self._refuse("unknown_request", f"frame for unknown request {h.req_id}")
            e.req_id = h.req_id
            raise e
        touched.add(h.req_id)
        try:
            if h.ndim != 5:
                raise self._refuse("shape", f"request {h.req_id}: ndim {h.ndim} is not 5")
            if not 1 <= h.nblocks < self.layout.num_blocks:
                raise self._refuse("block_ids", f"request {h.req_id}: {h.nblocks} block ids for a pool of "
                                   f"{self.layout.num_blocks}")
            ids_raw = bytes(F.recv_exact(sock, 4 * h.nblocks))
            ids = np.frombuffer(ids_raw, dtype="<i4").astype(np.int64)
            p = self._check_frame(h.req_id, h.layer, ids, h.dtype, h.shape, h.nbytes)
        except TransferRefused as e:
            e.req_id = h.req_id
            raise
        crc = bool(h.flags & F.FLAG_CRC)
        if crc and not is_tls:
            raise TransferRefused(self._refuse("checksum", f"request {h.req_id}: a CRC checksum on a connection "
                                               "without TLS").reason, h.req_id)
        buf = bytearray(h.nbytes)                      # h.nbytes == the size this pool expects
        F.recv_exact(sock, h.nbytes, buf)
        mac = F.new_checksum(key, F.pack_header(h), crc)
        mac.update(ids_raw)
        mac.update(buf)
        if not hmac.compare_digest(mac.digest(), h.mac):
            raise TransferRefused(self._refuse("checksum", f"request {h.req_id} layer {h.layer}: checksum "
                                               "mismatch").reason, h.req_id)
        payload = torch.frombuffer(buf, dtype=torch.uint8).view(self.layout.dtype).view(h.shape)
        if not self._write_layer(p, h.layer, payload):
            raise TransferRefused(f"request {h.req_id} is no longer expected (cancelled or timed out)", h.req_id)
        return h.req_id if self._finish_if_complete(p) else None

    @staticmethod
    def _drain(sock: socket.socket, limit_s: float = 0.5) -> None:
        """After an ERR: reads and drops what the sender still pushes (briefly) so that the
        close does not reset the connection before the sender has read the verdict."""
        try:
            sock.shutdown(socket.SHUT_WR)
            end = time.monotonic() + limit_s
            sink = bytearray(1 << 16)
            while time.monotonic() < end:
                sock.settimeout(max(end - time.monotonic(), 0.01))
                if sock.recv_into(sink) == 0:
                    return
        except OSError:
            pass

    @staticmethod
    def _reply(sock: socket.socket, key: bytes, req_id: int, kind: int, reason: str) -> None:
        body = reason.encode("utf-8")[:F.MAX_REASON]
        h = F.Header(kind, 0, 0, req_id, 0, 0, (), len(body))
        try:
            if key:
                mac = F.new_mac(key, F.pack_header(h))
                mac.update(body)
                sock.sendall(F.pack_header(h, mac.digest()) + body)
        except OSError:
            pass
