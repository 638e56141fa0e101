# SPDX-License-Identifier: Apache-2.0
"""The byte-stream connector's wire format: an authenticated handshake and a fixed binary frame.

Handshake (mutual, HMAC-SHA256 over two nonces with the shared secret; nothing secret is sent)::

    client -> server   b"MKVH" | u16 version | client_nonce[32]
    server -> client   server_nonce[32] | HMAC(secret, b"server" | cn | sn)
    client -> server   HMAC(secret, b"client" | cn | sn)
    server -> client   b"\\x01"                     (accepted; otherwise the server closes)
    session key = HMAC(secret, b"session" | cn | sn)

Frame (little-endian, ``HEADER.size`` bytes, then ``nblocks`` int32 block ids, then ``nbytes``
payload bytes)::

    magic 4s "MKV1" | kind u8 | dtype u8 | ndim u8 | flags u8 | seq u64 | req_id i64 | layer i32
    | nblocks u32 | shape 5 x u32 | nbytes u64 | mac 16s

``mac`` is a keyed BLAKE2b-128 (session key) over the header with a zero mac, the block ids and the
payload: the frame's checksum, bound to this connection. On a TLS connection (which authenticates
every byte already) the sender may set ``flags`` bit ``FLAG_CRC`` and put a CRC-32 there instead
(4 bytes, then zeros): several times cheaper; a receiver without TLS refuses such a frame. ``seq`` counts frames on a connection from
1; a frame whose seq is not the next one is a replay. kinds: LAYER (one layer's KV), ACK and ERR
(the receiver's verdict on a request; payload = a UTF-8 reason of at most ``MAX_REASON`` bytes).

Owns byte layouts only; nothing here reads a size from the wire without a bound. Must not import
torch or anything of the package.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import zlib

__all__ = ["HEADER", "MAGIC", "LAYER", "ACK", "ERR", "MAX_REASON", "FLAG_CRC", "Header", "recv_exact",
           "client_handshake", "server_handshake", "new_mac", "new_checksum", "pack_header", "unpack_header",
           "HandshakeError"]

MAGIC = b"MKV1"
HELLO = b"MKVH"
VERSION = 1
LAYER, ACK, ERR = 1, 3, 4
FLAG_CRC = 1
MAX_REASON = 1024
NONCE = 32
HEADER = struct.Struct("<4sBBBBQqiI5IQ16s")
_ZERO_MAC = bytes(16)


class HandshakeError(ConnectionError):
    """The peer did not prove knowledge of the shared secret (or spoke another protocol)."""


def recv_exact(sock: socket.socket, n: int, buf: bytearray | memoryview | None = None) -> memoryview:
    """Reads exactly ``n`` bytes (into ``buf`` if given); ConnectionError on a truncated stream."""
    out = memoryview(buf if buf is not None else bytearray(n))[:n]
    got = 0
    while got < n:
        k = sock.recv_into(out[got:], n - got)
        if k == 0:
            raise ConnectionError(f"truncated: the peer closed after {got} of {n} bytes")
        got += k
    return out


class Header:
    __slots__ = ("kind", "dtype", "ndim", "flags", "seq", "req_id", "layer", "nblocks", "shape", "nbytes", "mac")

    def __init__(self, kind: int, dtype: int, seq: int, req_id: int, layer: int, nblocks: int,
                 shape: tuple[int, ...], nbytes: int, mac: bytes = _ZERO_MAC, ndim: int = 5, flags: int = 0):
        self.kind, self.dtype, self.ndim, self.flags = kind, dtype, ndim, flags
        self.seq, self.req_id, self.layer, self.nblocks = seq, req_id, layer, nblocks
        self.shape, self.nbytes, self.mac = tuple(shape), nbytes, mac


def pack_header(h: Header, mac: bytes | None = None) -> bytes:
    shape = (tuple(h.shape) + (0,) * 5)[:5]
    return HEADER.pack(MAGIC, h.kind, h.dtype, h.ndim, h.flags, h.seq, h.req_id, h.layer, h.nblocks, *shape,
                       h.nbytes, _ZERO_MAC if mac is None else mac)


def unpack_header(raw: bytes | memoryview) -> Header:
    """Parses a header; ValueError on a bad magic (sizes are checked by the caller against its pool)."""
    magic, kind, dtype, ndim, flags, seq, req_id, layer, nblocks, s0, s1, s2, s3, s4, nbytes, mac = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ValueError(f"bad frame magic {bytes(magic)!r}")
    return Header(kind, dtype, seq, req_id, layer, nblocks, (s0, s1, s2, s3, s4)[:min(ndim, 5)], nbytes, bytes(mac),
                  ndim, flags)


def new_mac(session_key: bytes, header_zero_mac: bytes) -> "hashlib._Hash":
    """A keyed BLAKE2b-128 already fed with the header (mac field zeroed); feed ids and payload next."""
    h = hashlib.blake2b(key=session_key[:64], digest_size=16)
    h.update(header_zero_mac)
    return h


class _Crc32:
    """The TLS-only checksum, with the interface of a hashlib object."""

    def __init__(self, data: bytes) -> None:
        self._v = zlib.crc32(data)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._v = zlib.crc32(data, self._v)

    def digest(self) -> bytes:
        return struct.pack("<I", self._v) + bytes(12)


def new_checksum(session_key: bytes, header_zero_mac: bytes, crc: bool) -> "hashlib._Hash | _Crc32":
    """The frame checksum the header's flags name: CRC-32 (TLS connections only) or the keyed MAC."""
    return _Crc32(header_zero_mac) if crc else new_mac(session_key, header_zero_mac)


def _proof(secret: bytes, label: bytes, cn: bytes, sn: bytes) -> bytes:
    return hmac.new(secret, label + cn + sn, hashlib.sha256).digest()


def client_handshake(sock: socket.socket, secret: bytes) -> bytes:
    """Runs the client side; returns the session key. HandshakeError if the server is not genuine."""
    cn = os.urandom(NONCE)
    sock.sendall(HELLO + struct.pack("<H", VERSION) + cn)
    reply = recv_exact(sock, 2 * NONCE)
    sn, proof = bytes(reply[:NONCE]), bytes(reply[NONCE:])
    if not hmac.compare_digest(proof, _proof(secret, b"server", cn, sn)):
        raise HandshakeError("the receiver's handshake proof is wrong (different shared secret)")
    sock.sendall(_proof(secret, b"client", cn, sn))
    try:
        ok = recv_exact(sock, 1)
    except ConnectionError:
        raise HandshakeError("the receiver refused the handshake") from None
    if bytes(ok) != b"\x01":
        raise HandshakeError("the receiver refused the handshake")
    return _proof(secret, b"session", cn, sn)


def server_handshake(sock: socket.socket, secret: bytes) -> bytes:
    """Runs the server side; returns the session key. HandshakeError (nothing accepted) otherwise."""
    hello = recv_exact(sock, len(HELLO) + 2 + NONCE)
    if bytes(hello[:4]) != HELLO:
        raise HandshakeError("not a KV transfer client (bad hello)")
    (version,) = struct.unpack("<H", hello[4:6])
    if version != VERSION:
        raise HandshakeError(f"protocol version {version} is not {VERSION}")
    cn = bytes(hello[6:])
    sn = os.urandom(NONCE)
    sock.sendall(sn + _proof(secret, b"server", cn, sn))
    proof = bytes(recv_exact(sock, NONCE))
    if not hmac.compare_digest(proof, _proof(secret, b"client", cn, sn)):
        raise HandshakeError("wrong secret: the client's handshake proof does not verify")
    sock.sendall(b"\x01")
    return _proof(secret, b"session", cn, sn)
