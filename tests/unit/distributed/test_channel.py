# SPDX-License-Identifier: Apache-2.0
"""Collectives and the step-message channel over two local gloo processes: the collectives'
results against their definitions; the step message round-trips bitwise (random sizes, empty
arrays, odd float counts, NaN); every malformed header field and a bad checksum is refused with a
message naming it; a hung peer and a dead peer end in CollectiveTimeout within the timeout; a rank
that never joins ends in JoinTimeout. No process outlives its test."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from tp_harness import free_port  # noqa: E402

from mindie_llm.distributed.step_channel import MAGIC, VERSION, Kind, checksum, _pack  # noqa: E402


def _run(mode: str, world: int = 2, ranks=None, timeout_s: float = 20, limit: float = 90):
    port = free_port()
    procs = []
    try:
        for rank in (ranks if ranks is not None else range(world)):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), TEST_TIMEOUT_S=str(timeout_s), OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "channel_harness.py"), mode],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        t0 = time.monotonic()
        outs = [p.communicate(timeout=limit)[0] for p in procs]
        return [p.returncode for p in procs], outs, time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def healthy_run():
    """collectives, then the step-message round trip, then the malformed messages: one rank pair."""
    return _run("all")


def test_collectives_match_their_definitions(healthy_run):
    codes, outs, _ = healthy_run
    assert codes == [0, 0], outs
    assert "COLLECTIVES-OK" in outs[0]


def test_step_message_round_trip_is_bitwise(healthy_run):
    codes, outs, _ = healthy_run
    assert "ROUNDTRIP-OK" in outs[1], outs


def test_malformed_step_messages_are_refused(healthy_run):
    codes, outs, _ = healthy_run
    for name in ("magic", "version", "unknown kind", "sequence", "n_ints", "n_floats", "reserved", "checksum"):
        assert f"refused {name}:" in outs[1], outs[1]
    assert "MALFORMED-OK" in outs[1]


def test_hung_peer_times_out():
    codes, outs, took = _run("hang", timeout_s=3)
    assert codes[0] == 0, outs[0]
    assert "TIMEOUT after" in outs[0] and "a peer rank died or hangs" in outs[0]


def test_dead_peer_is_detected():
    codes, outs, took = _run("dead", timeout_s=10)
    assert codes == [0, 3], outs
    assert "DEAD-DETECTED" in outs[0]


def test_rank_that_never_joins_fails_start_up():
    codes, outs, took = _run("join", ranks=[0], timeout_s=3)
    assert codes == [0], outs
    assert "did not gather 2 ranks within 3 s" in outs[0], outs[0]


def test_checksum_sees_order_and_value():
    rng = np.random.default_rng(0)
    p = rng.integers(-(1 << 62), 1 << 62, 100, dtype=np.int64)
    c = checksum(p)
    q = p.copy()
    q[[3, 4]] = q[[4, 3]]
    assert checksum(q) != c
    q = p.copy()
    q[50] ^= 1
    assert checksum(q) != c
    assert checksum(p[:99]) != c
    packed = _pack(np.arange(3, dtype=np.int64), np.array([1.5], np.float32))
    assert packed.shape == (4,) and packed.dtype == np.int64
    assert MAGIC > 0 and VERSION == 1 and Kind.STEP == 1
