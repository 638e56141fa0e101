# SPDX-License-Identifier: Apache-2.0
"""One rank of the collective / step-channel tests: ``channel_harness.py MODE``. Exit code 0 means
the rank saw what MODE expects; anything else prints why. Started by test_channel.py with
torchrun's variables on loopback."""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch


def _messages(n: int):
    rng = np.random.default_rng(1234)
    for i in range(n):
        ni = int(rng.choice([0, 1, 7, 1000, int(rng.integers(0, 5000))]))
        nf = int(rng.choice([0, 1, 3, 64, int(rng.integers(0, 999))]))
        ints = rng.integers(-(1 << 62), 1 << 62, ni, dtype=np.int64)
        floats = rng.standard_normal(nf).astype(np.float32)
        if nf:
            floats[0] = np.float32("nan") if i % 3 == 0 else floats[0]
        yield ints, floats


def main(mode: str) -> int:
    from mindie_llm.distributed.parallel_state import JoinTimeout, destroy, init_from_env

    world = int(os.environ["WORLD_SIZE"])
    timeout = float(os.environ.get("TEST_TIMEOUT_S", "20"))
    t0 = time.monotonic()
    if mode == "join":
        try:
            init_from_env("gloo", tensor_parallel_size=world, timeout_s=timeout, join_timeout_s=timeout)
        except JoinTimeout as e:
            print(f"JOIN-TIMEOUT after {time.monotonic() - t0:.1f}s: {e}")
            return 0
        print("joined although the peer never started")
        return 1
    ctx = init_from_env("gloo", tensor_parallel_size=world, timeout_s=timeout)
    try:
        if mode == "all":     # the modes that leave the group healthy, one after the other
            for m in ("collectives", "roundtrip", "malformed"):
                code = _run_mode(m, ctx)
                if code:
                    return code
            return 0
        return _run_mode(mode, ctx)
    finally:
        if mode not in ("dead", "hang"):
            destroy()


def _run_mode(mode: str, ctx) -> int:
    from mindie_llm.distributed.parallel_state import CollectiveTimeout
    from mindie_llm.distributed.step_channel import (HEADER_WORDS, MAGIC, VERSION, Kind, MalformedMessage,
                                                     StepChannel, checksum)

    timeout = ctx.timeout_s
    t0 = time.monotonic()
    ch = StepChannel(ctx)
    if True:
        if mode == "roundtrip":
            msgs = list(_messages(40))
            if ctx.rank == 0:
                for ints, floats in msgs:
                    ch.send(Kind.STEP, ints, floats)
                ch.send(Kind.HEARTBEAT)
                ch.send(Kind.SHUTDOWN)
                return 0
            for i, (ints, floats) in enumerate(msgs):
                m = ch.recv()
                assert m.kind == Kind.STEP and m.seq == i + 1, (m.kind, m.seq)
                assert m.ints.dtype == np.int64 and m.floats.dtype == np.float32
                np.testing.assert_array_equal(m.ints, ints)
                assert m.floats.tobytes() == floats.tobytes(), i    # bitwise (NaN included)
            assert ch.recv().kind == Kind.HEARTBEAT
            assert ch.recv().kind == Kind.SHUTDOWN
            print("ROUNDTRIP-OK")
            return 0
        if mode == "malformed":
            good = [MAGIC, VERSION, int(Kind.STEP), 1, 0, 0, 0, 0]
            cases = [("magic", 0, 0x1234), ("version", 1, 99), ("unknown kind", 2, 42), ("sequence", 3, 7),
                     ("n_ints", 4, 1 << 40), ("n_floats", 5, -3), ("reserved", 7, 1)]
            if ctx.rank == 0:
                for _, idx, val in cases:
                    h = list(good)
                    h[idx] = val
                    ch.send_raw_header(np.array(h, dtype=np.int64))
                # a valid header whose payload does not match its checksum
                payload = np.arange(4, dtype=np.int64)
                h = [MAGIC, VERSION, int(Kind.STEP), 1, 4, 0, checksum(payload) ^ 1, 0]
                ch.send_raw_header(np.array(h, dtype=np.int64))
                ch._broadcast(torch.from_numpy(payload), "payload")
                ctx.barrier()
                return 0
            for name, _, _ in cases + [("checksum", None, None)]:
                try:
                    m = ch.recv()
                except MalformedMessage as e:
                    print(f"refused {name}: {e}")
                    ch._seq = 0        # the test keeps going; a worker stops here
                    continue
                print(f"accepted a message with a bad {name}: {m}")
                return 1
            assert HEADER_WORDS == 8
            ctx.barrier()
            print("MALFORMED-OK")
            return 0
        if mode == "hang":        # rank 1 never answers; rank 0's all-reduce must time out
            if ctx.rank == 1:
                time.sleep(timeout + 2)
                return 0
            try:
                ctx.all_reduce(torch.ones(4))
            except CollectiveTimeout as e:
                print(f"TIMEOUT after {time.monotonic() - t0:.1f}s: {e}")
                return 0
            print("all_reduce returned although the peer hangs")
            return 1
        if mode == "dead":        # rank 1 dies; rank 0's async all-reduce handle must raise
            ctx.all_reduce(torch.ones(4))
            if ctx.rank == 1:
                os._exit(3)
            time.sleep(0.5)
            try:
                h = ctx.all_reduce(torch.ones(1 << 16), async_op=True)
                h.wait()
            except CollectiveTimeout as e:
                print(f"DEAD-DETECTED after {time.monotonic() - t0:.1f}s: {e}")
                return 0
            print("all_reduce returned although the peer died")
            return 1
        if mode == "collectives":
            r = ctx.rank
            x = torch.full((3, 5), float(r + 1))
            assert torch.equal(ctx.all_reduce(x.clone()), torch.full((3, 5), 3.0))
            h = ctx.all_reduce(torch.ones(7) * (r + 1), async_op=True)
            assert torch.equal(h.wait(), torch.full((7,), 3.0))
            g = ctx.all_gather(torch.arange(6.0).reshape(2, 3) + 10 * r, dim=-1)
            assert torch.equal(g, torch.cat([torch.arange(6.0).reshape(2, 3), torch.arange(6.0).reshape(2, 3) + 10], -1))
            g0 = ctx.all_gather(torch.tensor([[r]]), dim=0)
            assert g0.flatten().tolist() == [0, 1]
            assert ctx.all_reduce_min(10 + r) == 10
            print("COLLECTIVES-OK")
            return 0
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    code = main(sys.argv[1])
    sys.stdout.flush()
    os._exit(code)   # skip process-group teardown (a dead or hung peer must not stall the exit)
