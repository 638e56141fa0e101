# SPDX-License-Identifier: Apache-2.0
"""The TCP byte-stream KV connector: bit-for-bit transfer (oracle: the sender's own blocks) and
the refusals of the receiver (wrong secret, truncated frame, byte count / block ids / layer /
shape / dtype mismatch, replay, unknown request, timeout): each refused with a logged reason,
nothing written to any block, and the receiver keeps serving the next transfer."""
from __future__ import annotations

import logging
import socket
import time

import numpy as np
import pytest
import torch

from mindie_llm.distributed.kv_transfer import frame as F
from mindie_llm.distributed.kv_transfer.base import DTYPE_CODES
from mindie_llm.distributed.kv_transfer.tcp import TcpConnector

SECRET = b"test-secret-0123456789abcdef"
L, NB, BS, H, D = 3, 16, 4, 2, 8


def caches(fill: bool, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, NB, BS, H, D, generator=g).to(dtype) if fill else torch.zeros(2, NB, BS, H, D, dtype=dtype)
            for _ in range(L)]


@pytest.fixture
def pair():
    rx = TcpConnector(caches(False), secret=SECRET)
    tx = TcpConnector(caches(True), secret=SECRET, listen=False)
    yield tx, rx
    tx.close()
    rx.close()


def all_zero(conn) -> bool:
    return all(not c.any() for c in conn.kv_caches)


def good_transfer(tx, rx, req=1000, dst=(7, 8), src=(1, 2)):
    fut = rx.expect(req, np.array(dst), timeout_s=5)
    res = tx.send(req, np.array(src), rx.address, np.array(dst), timeout_s=5)
    assert res.ok, res.reason
    assert fut.result(5).ok
    for layer in range(L):
        assert torch.equal(rx.kv_caches[layer][:, list(dst)], tx.kv_caches[layer][:, list(src)])


class Raw:
    """A hand-driven client that knows the secret and writes frames field by field."""

    def __init__(self, rx, secret=SECRET):
        host, _, port = rx.address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.key = F.client_handshake(self.sock, secret)
        self.seq = 0

    def frame(self, req, layer, ids, payload: torch.Tensor, *, seq=None, nbytes=None, shape=None, dtype=None,
              cut=None, bad_mac=False, flags=0):
        self.seq = self.seq + 1 if seq is None else seq
        raw = payload.contiguous().view(torch.uint8).numpy().tobytes()
        ids_b = np.asarray(ids, "<i4").tobytes()
        h = F.Header(F.LAYER, dtype or DTYPE_CODES[payload.dtype], self.seq, req, layer, len(ids),
                     shape or tuple(payload.shape), len(raw) if nbytes is None else nbytes, flags=flags)
        mac = F.new_checksum(self.key, F.pack_header(h), crc=bool(flags & F.FLAG_CRC))
        mac.update(ids_b)
        mac.update(raw)
        digest = bytes(16) if bad_mac else mac.digest()
        data = F.pack_header(h, digest) + ids_b + raw
        self.sock.sendall(data[:cut] if cut is not None else data)
        return data

    def verdict(self):
        h = F.unpack_header(F.recv_exact(self.sock, F.HEADER.size))
        return h.kind, bytes(F.recv_exact(self.sock, h.nbytes)).decode() if h.nbytes else ""


def layer_payload(n, dtype=torch.float32, value=1.0):
    return torch.full((2, n, BS, H, D), value, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transfer_is_bit_for_bit(dtype):
    rx = TcpConnector(caches(False, dtype), secret=SECRET)
    tx = TcpConnector(caches(True, dtype), secret=SECRET, listen=False)
    try:
        fut = rx.expect(5, np.array([3, 9, 4]), timeout_s=5)
        res = tx.send(5, np.array([10, 2, 6]), rx.address, np.array([3, 9, 4]), timeout_s=5)
        assert res.ok, res.reason
        assert res.num_bytes == L * 2 * 3 * BS * H * D * torch.empty((), dtype=dtype).element_size()
        r = fut.result(5)
        assert r.ok and r.num_bytes == res.num_bytes
        for layer in range(L):
            got, want = rx.kv_caches[layer], tx.kv_caches[layer]
            assert torch.equal(got[:, [3, 9, 4]].view(torch.uint8), want[:, [10, 2, 6]].view(torch.uint8))
            others = [b for b in range(NB) if b not in (3, 9, 4)]
            assert not got[:, others].any()
    finally:
        tx.close()
        rx.close()


def test_wrong_secret_refused_and_serving_continues(pair, caplog):
    tx, rx = pair
    bad = TcpConnector(caches(True), secret=b"another-secret-0123456789", listen=False)
    fut = rx.expect(1, np.array([2]), timeout_s=5)
    with caplog.at_level(logging.WARNING):
        res = bad.send(1, np.array([1]), rx.address, np.array([2]), timeout_s=2)
    assert not res.ok and "secret" in res.reason
    time.sleep(0.1)
    assert rx.refusals.get("auth") == 1 and all_zero(rx) and not fut.done()
    assert any("handshake" in r.message or "refused" in r.message for r in caplog.records)
    with pytest.raises(F.HandshakeError):       # a raw client with the wrong key gets nowhere either
        Raw(rx, secret=b"x" * 20)
    rx.cancel(1)
    good_transfer(tx, rx)
    bad.close()


def test_truncated_frame_fails_the_request_and_writes_nothing(pair):
    tx, rx = pair
    fut = rx.expect(3, np.array([5, 6]), timeout_s=5)
    raw = Raw(rx)
    data = raw.frame(3, 0, [5, 6], layer_payload(2), cut=F.HEADER.size + 8 + 100)
    assert len(data) > F.HEADER.size + 108
    raw.sock.close()
    r = fut.result(5)
    assert not r.ok and "truncated" in r.reason
    assert all_zero(rx) and rx.refusals.get("truncated") == 1
    good_transfer(tx, rx)


@pytest.mark.parametrize("case, kwargs, kind", [
    ("byte_count", dict(nbytes=2 * 2 * BS * H * D * 4 - 4), "byte_count"),
    ("block_ids", dict(ids=[5, 9]), "block_ids"),
    ("block_ids_other_request", dict(ids=[12, 13]), "block_ids"),
    ("block_count_huge", dict(ids=[5] * NB), "block_ids"),
    ("layer", dict(layer=L), "layer"),
    ("layer_negative", dict(layer=-1), "layer"),
    ("shape", dict(shape=(2, 2, BS, H + 1, D)), "shape"),
    ("dtype", dict(dtype=DTYPE_CODES[torch.float16]), "dtype"),
    ("checksum", dict(bad_mac=True), "checksum"),
    ("crc_without_tls", dict(flags=F.FLAG_CRC), "checksum"),
])
def test_mismatched_frames_are_refused(pair, case, kwargs, kind, caplog):
    tx, rx = pair
    fut = rx.expect(3, np.array([5, 6]), timeout_s=5)
    other = rx.expect(4, np.array([12, 13]), timeout_s=5)      # another request's blocks
    raw = Raw(rx)
    ids = kwargs.pop("ids", [5, 6])
    layer = kwargs.pop("layer", 0)
    with caplog.at_level(logging.WARNING):
        raw.frame(3, layer, ids, layer_payload(2), **kwargs)
        verdict, reason = raw.verdict()
    assert verdict == F.ERR and reason
    assert rx.refusals.get(kind) == 1, rx.refusals
    assert any("refused" in r.message for r in caplog.records)
    assert all_zero(rx)                                         # nothing written, to 3's or 4's blocks
    assert not fut.result(5).ok                                 # the broken transfer fails ...
    assert not other.done()                                     # ... the other request is untouched
    res = tx.send(4, np.array([1, 2]), rx.address, np.array([12, 13]), timeout_s=5)
    assert res.ok and other.result(5).ok                        # and the receiver keeps serving


def test_replayed_frames_are_refused(pair):
    tx, rx = pair
    fut = rx.expect(8, np.array([5, 6]), timeout_s=5)
    raw = Raw(rx)
    data = raw.frame(8, 0, [5, 6], layer_payload(2, value=1.0))
    raw.sock.sendall(data)                                      # verbatim replay: old seq
    kind, reason = raw.verdict()
    assert kind == F.ERR and "replay" in reason and rx.refusals.get("replay") == 1
    assert torch.equal(rx.kv_caches[0][:, [5, 6]], layer_payload(2, value=1.0))
    assert not fut.result(5).ok

    fut = rx.expect(9, np.array([7, 8]), timeout_s=5)
    raw = Raw(rx)
    raw.frame(9, 0, [7, 8], layer_payload(2, value=2.0))
    raw.frame(9, 0, [7, 8], layer_payload(2, value=3.0))          # fresh seq and mac, same layer again
    kind, reason = raw.verdict()
    assert kind == F.ERR and "already received" in reason and rx.refusals.get("replay") == 2
    assert torch.equal(rx.kv_caches[0][:, [7, 8]], layer_payload(2, value=2.0))   # not overwritten
    assert not fut.result(5).ok
    # a replay in a new connection fails the checksum (the session key differs)
    fut = rx.expect(10, np.array([9]), timeout_s=5)
    raw = Raw(rx)
    raw.sock.sendall(data.replace((8).to_bytes(8, "little", signed=True), (10).to_bytes(8, "little", signed=True), 1))
    kind, reason = raw.verdict()
    assert kind == F.ERR and rx.refusals.get("block_ids", 0) + rx.refusals.get("checksum", 0) == 1
    good_transfer(tx, rx, req=11, dst=(10, 11))


def test_unknown_request_refused(pair):
    tx, rx = pair
    fut = rx.expect(1, np.array([5, 6]), timeout_s=5)
    raw = Raw(rx)
    raw.frame(99, 0, [5, 6], layer_payload(2))
    kind, reason = raw.verdict()
    assert kind == F.ERR and "unknown request 99" in reason and rx.refusals.get("unknown_request") == 1
    assert all_zero(rx) and not fut.done()
    res = tx.send(1, np.array([3, 4]), rx.address, np.array([5, 6]), timeout_s=5)
    assert res.ok and fut.result(5).ok


def test_cancelled_request_gets_no_writes(pair):
    tx, rx = pair
    rx.expect(1, np.array([5, 6]), timeout_s=5)
    rx.cancel(1)
    res = tx.send(1, np.array([3, 4]), rx.address, np.array([5, 6]), timeout_s=5)
    assert not res.ok and "unknown request" in res.reason
    assert all_zero(rx)


def test_stalled_transfer_times_out_on_both_sides(pair):
    tx, rx = pair
    slow = TcpConnector(caches(True), secret=SECRET, listen=False, stall_s=0.4)
    fut = rx.expect(1, np.array([5, 6]), timeout_s=0.5)
    t0 = time.monotonic()
    res = slow.send(1, np.array([3, 4]), rx.address, np.array([5, 6]), timeout_s=0.9)
    r = fut.result(5)
    assert not r.ok and "timed out" in r.reason
    assert not res.ok and time.monotonic() - t0 < 3
    assert rx.num_pending == 0
    good_transfer(tx, rx)
    slow.close()


def _tls_contexts(tmp_path):
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    c, k = tmp_path / "cert.pem", tmp_path / "key.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv.load_cert_chain(c, k)
    cli = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cli.check_hostname = False
    cli.load_verify_locations(c)
    return srv, cli


def test_tls_transfer_bit_for_bit_and_plaintext_refused(tmp_path):
    srv, cli = _tls_contexts(tmp_path)
    rx = TcpConnector(caches(False), secret=SECRET, server_tls=srv)
    tx = TcpConnector(caches(True), secret=SECRET, client_tls=cli, listen=False)
    plain = TcpConnector(caches(True), secret=SECRET, listen=False)
    try:
        fut = rx.expect(1, np.array([4, 5]), timeout_s=5)
        bad = plain.send(1, np.array([1, 2]), rx.address, np.array([4, 5]), timeout_s=2)
        assert not bad.ok and all_zero(rx) and not fut.done()
        good_transfer(tx, rx, req=2, dst=(7, 8))
        rx.cancel(1)
    finally:
        for c in (rx, tx, plain):
            c.close()
