#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Prefill/decode disaggregation benchmark; prints tables.

    python scripts/bench_pd.py transfer [--blocks 64 --repeats 5]
    python scripts/bench_pd.py load [--rates 1,2,4 --requests 24 --ttft-slo 2.0 --itl-slo 0.2]

``transfer``: KV transfer bandwidth of each connector (TCP, TCP+TLS, gloo point-to-point between
two processes) for the embedded SmolLM2's KV layout, against two floors: an in-process block copy
(index_select + index_copy_ per layer) and raw loopback TCP (one sendall of the same bytes).

``load``: a Poisson arrival process at rising request rates against a colocated server (one
instance, 2 threads) and a PD deployment (router + 1 prefill + 1 decode, 1 thread each: the same
total CPU), over HTTP streaming: TTFT, inter-token latency p99 and goodput (DistServe: requests per
second meeting both the TTFT and the ITL bound).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
SECRET = "bench-pd-secret-0123456789abcdef"


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.1f} {min(xs):8.1f} {max(xs):8.1f}"


# ---------------------------------------------------------------------------------- transfer
def _layout():
    import torch

    return dict(layers=30, heads=3, dim=64, bs=16, dtype=torch.float32)   # SmolLM2-135M, fp32 KV


def _caches(nblocks: int, fill: bool):
    import torch

    lay = _layout()
    shape = (2, nblocks, lay["bs"], lay["heads"], lay["dim"])
    return [torch.randn(shape) if fill else torch.zeros(shape) for _ in range(lay["layers"])]


def _tls(tmp: Path):
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
    c, k = tmp / "c.pem", tmp / "k.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv.load_cert_chain(c, k)
    cli = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cli.check_hostname = False
    cli.load_verify_locations(c)
    return srv, cli


def _p2p_worker(rank: int, port: int, nblocks: int, repeats: int, ready_q, res_q) -> None:
    from mindie_llm.distributed.kv_transfer.p2p import P2PConnector, make_transfer_group

    import torch

    torch.set_num_threads(1)
    group = make_transfer_group(f"127.0.0.1:{port}", rank, 2, timeout_s=60)
    ids = np.arange(1, nblocks, dtype=np.int64)
    if rank == 1:
        conn = P2PConnector(_caches(nblocks, False), group=group, receive=True)
        for r in range(repeats + 1):
            fut = conn.expect(r + 1, ids, timeout_s=60)
            ready_q.put(r)
            fut.result(60)
        time.sleep(1)
    else:
        conn = P2PConnector(_caches(nblocks, True), group=group, receive=False)
        times = []
        for r in range(repeats + 1):
            assert ready_q.get(timeout=60) == r
            t0 = time.perf_counter()
            res = conn.send(r + 1, ids, "1", ids, timeout_s=60)
            if r:
                times.append((res.num_bytes, time.perf_counter() - t0))
        res_q.put(times)


def bench_transfer(args: argparse.Namespace) -> None:
    import torch

    from mindie_llm.distributed.kv_transfer.tcp import TcpConnector

    torch.set_num_threads(args.threads)     # on a shared, oversubscribed box 2+ threads spin: 10x slower copies
    nb = args.blocks + 1
    src, dst = _caches(nb, True), _caches(nb, False)
    ids = np.arange(1, nb, dtype=np.int64)
    nbytes = sum(c[:, 1:].numel() * 4 for c in src)
    rows = []

    idx = torch.from_numpy(ids)
    ts = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for s, d in zip(src, dst):
            d.index_copy_(1, idx, s.index_select(1, idx))
        ts.append(nbytes / (time.perf_counter() - t0) / 1e6)
    rows.append(("in-process block copy (floor)", ts))

    payload = os.urandom(nbytes)
    ts = []
    for _ in range(args.repeats):
        srv = socket.create_server(("127.0.0.1", 0))
        got = []

        def sink(s=srv):
            c, _ = s.accept()
            n = 0
            buf = bytearray(1 << 20)
            while n < nbytes:
                n += c.recv_into(buf)
            got.append(n)
            c.close()
        th = threading.Thread(target=sink)
        th.start()
        t0 = time.perf_counter()
        with socket.create_connection(srv.getsockname()) as c:
            c.sendall(payload)
            th.join()
        ts.append(nbytes / (time.perf_counter() - t0) / 1e6)
        srv.close()
    rows.append(("raw loopback TCP (floor)", ts))

    with tempfile.TemporaryDirectory() as tmp:
        tls = _tls(Path(tmp))
        for label, kw in (("tcp connector", {}), ("tcp connector + TLS", "tls")):
            s_tls, c_tls = tls if kw == "tls" else (None, None)
            rx = TcpConnector(_caches(nb, False), secret=SECRET.encode(), server_tls=s_tls)
            tx = TcpConnector(src, secret=SECRET.encode(), client_tls=c_tls, listen=False)
            ts = []
            for r in range(args.repeats + 1):
                fut = rx.expect(r + 1, ids, timeout_s=60)
                t0 = time.perf_counter()
                res = tx.send(r + 1, ids, rx.address, ids, timeout_s=60)
                assert res.ok and fut.result(60).ok, res.reason
                if r:
                    ts.append(res.num_bytes / (time.perf_counter() - t0) / 1e6)
            rows.append((label, ts))
            rx.close()
            tx.close()

    ctx = mp.get_context("spawn")
    ready_q, res_q = ctx.Queue(), ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_p2p_worker, args=(r, port, nb, args.repeats, ready_q, res_q)) for r in (0, 1)]
    for p in procs:
        p.start()
    tx_times = res_q.get(timeout=300)
    for p in procs:
        p.join(60)
    if tx_times:
        rows.append(("gloo p2p connector (2 processes)", [b / t / 1e6 for b, t in tx_times]))

    print(f"\nKV transfer, {args.blocks} blocks of SmolLM2-135M fp32 KV ({nbytes / 1e6:.1f} MB), "
          f"{args.repeats} runs, {args.threads} torch thread(s), MB/s (median / min / max)")
    print(f"{'path':36s} {'median':>8s} {'min':>8s} {'max':>8s}")
    for label, ts in rows:
        print(f"{label:36s} {_spread(ts)}")


# ---------------------------------------------------------------------------------- load
def _spawn(tmp: Path, name: str, cfg: dict) -> tuple[subprocess.Popen, Path]:
    import yaml

    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    log = tmp / f"{name}.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), TQDM_DISABLE="1", MINDIE_KV_TRANSFER_KEY=SECRET)
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "mindie_llm.server.launcher", "--config", str(p)],
                                stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, log


def _wait(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> re.Match:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = re.search(pattern, log.read_text(errors="replace"))
        if m:
            return m
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"{log.name} did not start:\n{log.read_text(errors='replace')[-2000:]}")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BASE = {"model": {"dtype": "float32", "max_seq_len": 1024, "served_model_name": "SmolLM2-135M-Instruct"},
        "cache": {"cache_block_size": 16, "num_blocks": 512},
        "scheduler": {"max_batch_size": 32, "max_prefill_tokens": 1024},
        "server": {"host": "127.0.0.1", "http_port": 0, "grpc_port": -1, "max_tokens_limit": 512}}


def _deploy(tmp: Path, kind: str) -> tuple[str, list[subprocess.Popen]]:
    procs = []
    if kind.startswith("colocated"):
        threads = int(kind.partition(":")[2] or 2)
        proc, log = _spawn(tmp, "colo", {**BASE, "backend": {"device": "cpu", "num_threads": threads}})
        procs.append(proc)
        return _wait(log, r"http=(\S+)", proc).group(1), procs
    addrs = {}
    logs = []
    for role in ("prefill", "decode"):
        port = _port()
        addrs[role] = f"127.0.0.1:{port}"
        proc, log = _spawn(tmp, role, {**BASE, "backend": {"device": "cpu", "num_threads": 1},
                                       "server": {**BASE["server"], "http_port": -1, "grpc_port": port},
                                       "disaggregation": {"role": role}})
        procs.append(proc)
        logs.append((log, proc))
    for log, proc in logs:
        _wait(log, r"ready: grpc=", proc)
    proc, log = _spawn(tmp, "router", {**BASE, "disaggregation": {
        "role": "router", "prefill_instances": addrs["prefill"], "decode_instances": addrs["decode"]}})
    procs.append(proc)
    return _wait(log, r"http=(\S+)", proc).group(1), procs


async def _one(client, url: str, prompt: str, max_tokens: int) -> tuple[float, list[float]] | None:
    t0 = time.perf_counter()
    stamps = []
    body = {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0.0, "ignore_eos": True}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                return None
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    if json.loads(line[6:]).get("choices"):
                        stamps.append(time.perf_counter())
    except Exception:  # noqa: BLE001 - a failed request counts as missing the SLO
        return None
    if not stamps:
        return None
    return stamps[0] - t0, list(np.diff(stamps))


async def _poisson(url: str, rate: float, n: int, prompt_words: int, max_tokens: int, seed: int) -> list:
    import httpx

    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=512)) as c:
        tasks = []
        for i in range(n):
            prompt = f"{i} " + " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega"])
                                        for _ in range(prompt_words))
            tasks.append(asyncio.ensure_future(_one(c, url, prompt, max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        return await asyncio.gather(*tasks)


def bench_load(args: argparse.Namespace) -> None:
    rates = [float(r) for r in args.rates.split(",")]
    itl_slos = [float(x) for x in str(args.itl_slo).split(",")]
    table = []
    for kind in args.deployments.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            url, procs = _deploy(Path(tmp), kind)
            try:
                asyncio.run(_poisson(url, 100.0, 4, args.prompt_words, 4, 0))           # warm-up
                for rate in rates:
                    t0 = time.perf_counter()
                    res = asyncio.run(_poisson(url, rate, args.requests, args.prompt_words, args.max_tokens, 1))
                    wall = time.perf_counter() - t0
                    ok = [r for r in res if r is not None]
                    ttft = [r[0] for r in ok]
                    itl = [x for r in ok for x in r[1]]
                    good = [sum(1 for r in ok if r[0] <= args.ttft_slo and max(r[1], default=0) <= slo) / wall
                            for slo in itl_slos]
                    table.append((kind, rate, len(ok), len(res), np.median(ttft) if ttft else float("nan"),
                                  np.percentile(ttft, 99) if ttft else float("nan"),
                                  np.percentile(itl, 99) if itl else float("nan"), good, len(ok) / wall))
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                for p in procs:
                    try:
                        p.wait(30)
                    except subprocess.TimeoutExpired:
                        p.kill()
    print(f"\nPoisson load, {args.requests} requests per rate, ~{args.prompt_words} prompt words, "
          f"{args.max_tokens} output tokens; goodput = requests/s with TTFT <= {args.ttft_slo}s and every "
          f"inter-token gap <= the ITL bound")
    heads = " ".join(f"{'good@' + str(x) + 's':>11s}" for x in itl_slos)
    print(f"{'deployment':12s} {'rate/s':>6s} {'ok':>7s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'ITL p99':>8s} "
          f"{heads} {'tput/s':>7s}")
    for kind, rate, ok, n, t50, t99, i99, good, tput in table:
        goods = " ".join(f"{g:11.2f}" for g in good)
        print(f"{kind:12s} {rate:6.1f} {ok:3d}/{n:<3d} {t50:9.3f} {t99:9.3f} {i99:8.3f} {goods} {tput:7.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("transfer")
    t.add_argument("--blocks", type=int, default=64)
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the copies")
    ld = sub.add_parser("load")
    ld.add_argument("--rates", default="1,2,4")
    ld.add_argument("--deployments", default="colocated:2,pd",
                    help="colocated:THREADS and/or pd (1 prefill + 1 decode, one thread each)")
    ld.add_argument("--requests", type=int, default=24)
    ld.add_argument("--prompt-words", type=int, default=64)
    ld.add_argument("--max-tokens", type=int, default=16)
    ld.add_argument("--ttft-slo", type=float, default=2.0)
    ld.add_argument("--itl-slo", default="0.2,1.0", help="one or more ITL bounds (comma-separated)")
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start (shared, noisy)")
    (bench_transfer if args.what == "transfer" else bench_load)(args)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
