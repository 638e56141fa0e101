# SPDX-License-Identifier: Apache-2.0
"""The gloo point-to-point KV connector between two processes of one group: the transferred KV
equals the sender's blocks bit for bit (oracle: the sender's caches, rebuilt from the same seed in
the receiver), and a frame for an unknown request or with the wrong block ids is refused without a
write while the stream stays in step for the next transfer."""
from __future__ import annotations

import multiprocessing as mp
import socket

import pytest

L, NB, BS, H, D = 3, 16, 4, 2, 8


def _caches(fill, dtype, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, NB, BS, H, D, generator=g).to(dtype) if fill else torch.zeros(2, NB, BS, H, D, dtype=dtype)
            for _ in range(L)]


def _worker(rank, port, dtype_name, ready, go, results):
    import numpy as np
    import torch

    from mindie_llm.distributed.kv_transfer.p2p import P2PConnector, make_transfer_group

    dtype = getattr(torch, dtype_name)
    group = make_transfer_group(f"127.0.0.1:{port}", rank, 2, timeout_s=30)
    if rank == 1:                                     # receiver (decode side)
        conn = P2PConnector(_caches(False, dtype), group=group, receive=True)
        a = conn.expect(5, np.array([3, 9, 4]), timeout_s=20)
        b = conn.expect(6, np.array([7, 8]), timeout_s=20)
        ready.set()
        ra, rb = a.result(25), b.result(25)
        want = _caches(True, dtype)
        exact = all(torch.equal(conn.kv_caches[l][:, [3, 9, 4]].view(torch.uint8),
                                want[l][:, [10, 2, 6]].view(torch.uint8)) for l in range(L))
        untouched = all(not conn.kv_caches[l][:, [b_ for b_ in range(NB) if b_ not in (3, 9, 4, 7, 8)]].any()
                        for l in range(L))
        results.put(("rx", ra.ok, ra.reason, rb.ok, rb.reason, exact, untouched, dict(conn.refusals)))
        go.wait(25)
    else:                                             # sender (prefill side)
        conn = P2PConnector(_caches(True, dtype), group=group, receive=False)
        ready.wait(25)
        bad = conn.send(99, np.array([1]), "1", np.array([3]), timeout_s=10)       # unknown request
        bad2 = conn.send(6, np.array([1, 2]), "1", np.array([8, 7]), timeout_s=10)  # wrong block ids
        good = conn.send(5, np.array([10, 2, 6]), "1", np.array([3, 9, 4]), timeout_s=10)
        results.put(("tx", bad.ok, bad2.ok, good.ok, good.reason, good.num_bytes))
        go.set()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("dtype_name", ["bfloat16"])   # the uint8 view path; float32 is the same code
def test_p2p_gloo_transfer_bit_for_bit_and_refusals(dtype_name):
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Event(), ctx.Event(), ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, dtype_name, ready, go, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = {}
        for _ in range(2):
            item = results.get(timeout=90)
            got[item[0]] = item[1:]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    ra_ok, ra_reason, rb_ok, rb_reason, exact, untouched, refusals = got["rx"]
    bad_ok, bad2_ok, good_ok, good_reason, nbytes = got["tx"]
    assert good_ok and ra_ok, (good_reason, ra_reason)
    assert exact and untouched
    itemsize = 4 if dtype_name == "float32" else 2
    assert nbytes == L * 2 * 3 * BS * H * D * itemsize
    assert bad_ok and bad2_ok          # no acknowledgements on this connector: the sender cannot tell
    assert not rb_ok and "block ids" in rb_reason
    assert refusals.get("unknown_request") == L + (L - 1) and refusals.get("block_ids") == 1


def _idle_worker(rank, port, both_up, results):
    import time

    import numpy as np
    import torch

    from mindie_llm.distributed.kv_transfer.p2p import P2PConnector, make_transfer_group

    both_up.wait(60)                                   # torch imported on both sides: join fast
    group = make_transfer_group(f"127.0.0.1:{port}", rank, 2, timeout_s=3)
    if rank == 1:
        conn = P2PConnector(_caches(False, torch.float32), group=group, receive=True)
        fut = conn.expect(1, np.array([2, 3]), timeout_s=30)
        res = fut.result(30)
        results.put(("rx", res.ok, res.reason,
                     all(torch.equal(conn.kv_caches[l][:, [2, 3]], _caches(True, torch.float32)[l][:, [5, 6]])
                         for l in range(L))))
    else:
        conn = P2PConnector(_caches(True, torch.float32), group=group, receive=False)
        time.sleep(5)                                  # idle past the group's 3 s timeout
        res = conn.send(1, np.array([5, 6]), "1", np.array([2, 3]), timeout_s=10)
        results.put(("tx", res.ok, res.reason))


def test_p2p_receiver_survives_an_idle_period_longer_than_the_group_timeout():
    """An idle decode instance keeps receiving: its wait for the next header is not bounded by
    the transfer group's timeout (it was: after 120 s without a transfer the receiver died)."""
    ctx = mp.get_context("spawn")
    both_up, results = ctx.Barrier(2), ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_idle_worker, args=(r, port, both_up, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = {}
        for _ in range(2):
            item = results.get(timeout=90)
            got[item[0]] = item[1:]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert got["tx"][0], got["tx"][1]
    assert got["rx"][0] and got["rx"][2], got["rx"][1]
