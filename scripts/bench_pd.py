#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Prefill/decode disaggregation benchmark; prints tables.

    python scripts/bench_pd.py transfer [--blocks 64 --repeats 5]
    python scripts/bench_pd.py transfer --device cuda:0 --peer-device cuda:1 --layout llama3-8b \\
        --connectors tcp,p2p-gloo,p2p-nccl                      # GPU to GPU (NCCL over NVLink)
    python scripts/bench_pd.py load [--rates 1,2,4 --requests 24 --ttft-slo 2.0 --itl-slo 0.2]

``transfer``: KV transfer bandwidth of each connector (TCP, TCP+TLS, gloo or NCCL point-to-point
between two processes) for a KV layout (the embedded SmolLM2's, or Llama-3-8B's in bf16), against
floors: an in-process block copy (index_select + index_copy_ per layer; across two GPUs a peer
copy) and raw loopback TCP on the CPU, one contiguous device copy on a GPU. Pools on a GPU are
checked bit for bit after the transfers.

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
LAYOUTS = {   # (layers, KV heads, head dim, block size, dtype name)
    "smollm2": (30, 3, 64, 16, "float32"),        # SmolLM2-135M, fp32 KV (the CPU deployment)
    "llama3-8b": (32, 8, 128, 16, "bfloat16"),    # Llama-3-8B, bf16 KV (2 MiB a block)
}


def _layout(name: str = "smollm2"):
    import torch

    layers, heads, dim, bs, dtype = LAYOUTS[name]
    return dict(layers=layers, heads=heads, dim=dim, bs=bs, dtype=getattr(torch, dtype))


def _caches(nblocks: int, fill: bool, device: str = "cpu", layout: str = "smollm2"):
    import torch

    lay = _layout(layout)
    shape = (2, nblocks, lay["bs"], lay["heads"], lay["dim"])
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(shape, generator=g, device=device).to(lay["dtype"]) if fill
            else torch.zeros(shape, dtype=lay["dtype"], device=device) for _ in range(lay["layers"])]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


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


def _p2p_worker(rank: int, port: int, nblocks: int, repeats: int, ready_q, res_q, device: str = "cpu",
                layout: str = "smollm2", backend: str = "gloo") -> None:
    from mindie_llm.distributed.comm_env import apply_comm_env
    from mindie_llm.distributed.kv_transfer.p2p import P2PConnector, make_transfer_group

    import torch

    apply_comm_env()
    torch.set_num_threads(1)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    try:
        group = make_transfer_group(f"127.0.0.1:{port}", rank, 2, timeout_s=60, backend=backend)
        ids = np.arange(1, nblocks, dtype=np.int64)
        if rank == 1:
            conn = P2PConnector(_caches(nblocks, False, device, layout), group=group, receive=True)
            want = _caches(nblocks, True, device, layout) if device.startswith("cuda") else None
            for r in range(repeats + 1):
                fut = conn.expect(r + 1, ids, timeout_s=60)
                ready_q.put(r)
                res = fut.result(60)
                if not res.ok:
                    res_q.put(("rx", f"transfer {r} failed: {res.reason}"))
                    return
            exact = want is None or all(torch.equal(a[:, 1:].view(torch.uint8), b[:, 1:].view(torch.uint8))
                                        for a, b in zip(conn.kv_caches, want))
            res_q.put(("rx", "bit-exact" if exact else "MISMATCH"))
            time.sleep(1)
        else:
            conn = P2PConnector(_caches(nblocks, True, device, layout), group=group, receive=False)
            times = []
            for r in range(repeats + 1):
                assert ready_q.get(timeout=60) == r
                _sync(device)
                t0 = time.perf_counter()
                res = conn.send(r + 1, ids, "1", ids, timeout_s=60)
                if not res.ok:
                    res_q.put(("tx", f"send failed: {res.reason}"))
                    return
                if r:
                    times.append((res.num_bytes, time.perf_counter() - t0))
            res_q.put(("tx", times))
    except Exception as e:  # noqa: BLE001 - reported in the table
        res_q.put(("tx" if rank == 0 else "rx", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"))


def _p2p_run(nb: int, repeats: int, devices: tuple[str, str], layout: str, backend: str) -> tuple[list, str]:
    """(MB/s of each timed send, the receiver's verdict) of the p2p connector between two processes."""
    ctx = mp.get_context("spawn")
    ready_q, res_q = ctx.Queue(), ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_p2p_worker, args=(r, port, nb, repeats, ready_q, res_q, devices[r], layout, backend))
             for r in (0, 1)]
    for p in procs:
        p.start()
    got: dict = {}
    try:
        while len(got) < 2:
            kind, val = res_q.get(timeout=240)
            got[kind] = val
            if isinstance(val, str) and not val.startswith("bit-exact"):
                break
    except Exception as e:  # noqa: BLE001
        got.setdefault("tx", f"no result: {type(e).__name__}")
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    tx, rx = got.get("tx", "no result"), got.get("rx", "no verdict")
    if isinstance(tx, str):
        return [], tx
    return [b / t / 1e6 for b, t in tx], rx


def bench_transfer(args: argparse.Namespace) -> None:
    import torch

    from mindie_llm.distributed.kv_transfer.tcp import TcpConnector

    torch.set_num_threads(args.threads)     # on a shared, oversubscribed box 2+ threads spin: 10x slower copies
    dev = args.device
    peer = args.peer_device or dev
    nb = args.blocks + 1
    src, dst = _caches(nb, True, dev, args.layout), _caches(nb, False, peer, args.layout)
    ids = np.arange(1, nb, dtype=np.int64)
    nbytes = sum(c[:, 1:].numel() * c.element_size() for c in src)
    rows = []

    idx, pidx = torch.from_numpy(ids).to(dev), torch.from_numpy(ids).to(peer)
    ts = []
    for _ in range(args.repeats):
        _sync(dev)
        t0 = time.perf_counter()
        for s, d in zip(src, dst):
            d.index_copy_(1, pidx, s.index_select(1, idx).to(peer))
        _sync(dev)
        _sync(peer)
        ts.append(nbytes / (time.perf_counter() - t0) / 1e6)
    where = "in-process block copy" if peer == dev else f"block copy {dev} -> {peer} (peer)"
    rows.append((f"{where} (floor)", ts, ""))
    if dev.startswith("cuda"):
        flat_src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        flat_dst = torch.empty(nbytes, dtype=torch.uint8, device=peer)
        ts = []
        for _ in range(args.repeats):
            _sync(dev)
            t0 = time.perf_counter()
            flat_dst.copy_(flat_src)
            _sync(dev)
            _sync(peer)
            ts.append(nbytes / (time.perf_counter() - t0) / 1e6)
        rows.append((f"one contiguous copy {dev} -> {peer} (floor)", ts, ""))
        del flat_src, flat_dst
    else:
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
        rows.append(("raw loopback TCP (floor)", ts, ""))

    connectors = args.connectors.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tls = _tls(Path(tmp)) if "tcp-tls" in connectors else (None, None)
        for label in ("tcp", "tcp-tls"):
            if label not in connectors:
                continue
            s_tls, c_tls = tls if label == "tcp-tls" else (None, None)
            rx = TcpConnector(_caches(nb, False, peer, args.layout), secret=SECRET.encode(), server_tls=s_tls)
            tx = TcpConnector(src, secret=SECRET.encode(), client_tls=c_tls, listen=False)
            ts = []
            for r in range(args.repeats + 1):
                fut = rx.expect(r + 1, ids, timeout_s=60)
                t0 = time.perf_counter()
                res = tx.send(r + 1, ids, rx.address, ids, timeout_s=60)
                assert res.ok and fut.result(60).ok, res.reason
                _sync(peer)
                if r:
                    ts.append(res.num_bytes / (time.perf_counter() - t0) / 1e6)
            exact = all(torch.equal(a[:, 1:].view(torch.uint8).cpu(), b[:, 1:].view(torch.uint8).cpu())
                        for a, b in zip(rx.kv_caches, src))
            rows.append(("tcp connector" + (" + TLS" if label == "tcp-tls" else ""), ts,
                         "bit-exact" if exact else "MISMATCH"))
            rx.close()
            tx.close()

    for label in connectors:
        if label.startswith("p2p-"):
            backend = label.partition("-")[2]
            ts, verdict = _p2p_run(nb, args.repeats, (dev, peer), args.layout, backend)
            rows.append((f"{backend} p2p connector (2 processes)", ts, verdict))

    print(f"\nKV transfer, {args.blocks} blocks of {args.layout} KV ({nbytes / 1e6:.1f} MB), {dev} -> {peer}, "
          f"{args.repeats} runs, {args.threads} torch thread(s), MB/s (median / min / max)")
    print(f"{'path':44s} {'median':>8s} {'min':>8s} {'max':>8s}  check")
    for label, ts, note in rows:
        print(f"{label:44s} {_spread(ts) if ts else '     n/a      n/a      n/a'}  {note}")


# ---------------------------------------------------------------------------------- load
def _spawn(tmp: Path, name: str, cfg: dict, gpu: str | None = None) -> tuple[subprocess.Popen, Path]:
    import yaml

    from mindie_llm.distributed.comm_env import with_comm_env

    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    log = tmp / f"{name}.log"
    env = with_comm_env(PYTHONPATH=str(ROOT / "python"), TQDM_DISABLE="1", MINDIE_KV_TRANSFER_KEY=SECRET,
                        **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}))
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


def _backend_cfg(device: str, threads: int) -> dict:
    return {"device": "cpu", "num_threads": threads} if device == "cpu" else {"device": device}


def _deploy(tmp: Path, kind: str, device: str = "cpu") -> tuple[list[str], list[subprocess.Popen]]:
    """``colocated:T`` (one instance, T threads), ``colocated-dp2`` (two instances, on GPU 0 and 1
    with ``--device cuda``; the client alternates between them) or ``pd`` (router + prefill +
    decode; on GPUs prefill on GPU 0, decode on GPU 1). Returns the HTTP URLs and the processes."""
    gpu = device != "cpu"
    procs = []
    if kind.startswith("colocated"):
        n = 2 if kind == "colocated-dp2" else 1
        threads = 1 if n == 2 else int(kind.partition(":")[2] or 2)
        urls, logs = [], []
        for i in range(n):
            proc, log = _spawn(tmp, f"colo{i}", {**BASE, "backend": _backend_cfg(device, threads)},
                               str(i) if gpu else None)
            procs.append(proc)
            logs.append((log, proc))
        for log, proc in logs:
            urls.append(_wait(log, r"http=(\S+)", proc).group(1))
        return urls, procs
    addrs = {}
    logs = []
    for i, role in enumerate(("prefill", "decode")):
        port = _port()
        addrs[role] = f"127.0.0.1:{port}"
        proc, log = _spawn(tmp, role, {**BASE, "backend": _backend_cfg(device, 1),
                                       "server": {**BASE["server"], "http_port": -1, "grpc_port": port},
                                       "disaggregation": {"role": role}}, str(i) if gpu else None)
        procs.append(proc)
        logs.append((log, proc))
    for log, proc in logs:
        _wait(log, r"ready: grpc=", proc)
    proc, log = _spawn(tmp, "router", {**BASE, "disaggregation": {
        "role": "router", "prefill_instances": addrs["prefill"], "decode_instances": addrs["decode"]}})
    procs.append(proc)
    return [_wait(log, r"http=(\S+)", proc).group(1)], procs


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


async def _poisson(urls: list[str], rate: float, n: int, prompt_words: int, max_tokens: int, seed: int) -> list:
    import httpx

    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=512)) as c:
        tasks = []
        for i in range(n):
            prompt = f"{i} " + " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega"])
                                        for _ in range(prompt_words))
            tasks.append(asyncio.ensure_future(_one(c, urls[i % len(urls)], prompt, max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        return await asyncio.gather(*tasks)


def bench_load(args: argparse.Namespace) -> None:
    rates = [float(r) for r in args.rates.split(",")]
    itl_slos = [float(x) for x in str(args.itl_slo).split(",")]
    table = []
    for kind in args.deployments.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            url, procs = _deploy(Path(tmp), kind, args.device)
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
    t.add_argument("--device", default="cpu", help="where the sender's pool lives: cpu, cuda:0 ...")
    t.add_argument("--peer-device", default=None, help="the receiver's pool (default: --device; cuda:1 = across GPUs)")
    t.add_argument("--layout", default="smollm2", choices=sorted(LAYOUTS))
    t.add_argument("--connectors", default="tcp,tcp-tls,p2p-gloo",
                   help="tcp, tcp-tls, p2p-gloo, p2p-nccl (NCCL needs the two pools on two GPUs)")
    ld = sub.add_parser("load")
    ld.add_argument("--rates", default="1,2,4")
    ld.add_argument("--deployments", default="colocated:2,pd",
                    help="colocated:THREADS, colocated-dp2 (two instances, the client alternates) and/or pd "
                         "(1 prefill + 1 decode, one thread each)")
    ld.add_argument("--device", default="cpu", help="cpu, or cuda: instances on GPU 0 and GPU 1")
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
