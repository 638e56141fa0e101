# SPDX-License-Identifier: Apache-2.0
"""``mindie-llm bench serve``: a serving benchmark client, in the manner of vLLM's benchmark_serving.

Sends ``--num-requests`` streaming requests over HTTP (OpenAI ``/v1/completions`` with SSE) or gRPC
(``mindie.v1.GenerationService/GenerateStream``), at a Poisson rate (``--request-rate``; ``inf`` sends
them all at once), and prints throughput and TTFT / time-per-output-token / inter-token-latency /
end-to-end latency percentiles (mean, p50, p90, p99). ``--out DIR`` also writes ``requests.csv``
(one row per request), ``summary.json`` and ``plot.png`` (latency CDFs and throughput over time).

A client only: must not import torch, the engine or the servers; it talks over the wire (the gRPC
path uses the generated mindie.v1 stubs).
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import random
import ssl
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "main", "run_benchmark", "RequestResult", "summarize"]

_WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had "
          "by word but not what all were we when your can said there use an each which she do how their if will "
          "up other about out many then them these so some her would make like him into time has look two more "
          "write go see number no way could people my than first water been call who oil its now find long down "
          "day did get come made may part").split()


@dataclass
class RequestResult:
    """What one request measured; times are seconds (``start`` from the benchmark's start)."""

    index: int
    start: float = 0.0
    success: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = math.nan          # time to first token
    latency: float = math.nan       # end to end
    itls: list[float] = field(default_factory=list)   # gaps between streamed chunks after the first

    @property
    def tpot(self) -> float:
        """Time per output token after the first."""
        if self.output_tokens <= 1 or math.isnan(self.latency):
            return math.nan
        return (self.latency - self.ttft) / (self.output_tokens - 1)


# ---------------------------------------------------------------------- arguments
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the ``bench serve`` options to ``parser``."""
    p = parser
    p.add_argument("--host", default="127.0.0.1", help="server host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="server port (default 8000 for http, 8001 for grpc)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http", help="wire protocol (default http)")
    p.add_argument("--model", default=None, help="model name (default: ask the server)")
    p.add_argument("--num-requests", type=int, default=100, help="requests to send (default 100)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="mean requests per second, Poisson arrivals; inf sends all at once (default inf)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight (default none)")
    p.add_argument("--input-len", type=int, default=128, help="words per random prompt (about one token each)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens of each request (default 64)")
    p.add_argument("--dataset", default=None,
                   help="prompts to use instead of random ones: a .jsonl file with a 'prompt' field per line, "
                        "or a text file with one prompt per line")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (default: ignore EOS so every request makes --output-len tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0, greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and arrival times")
    p.add_argument("--api-key", default=None, help="API key (default: $MINDIE_API_KEY)")
    p.add_argument("--tls-ca", default=None, help="CA certificate (PEM) to connect over TLS")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--out", default=None, help="directory for requests.csv, summary.json and plot.png")
    return p


def _validate(args: argparse.Namespace) -> None:
    for name in ("num_requests", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1")
    if not args.request_rate > 0:
        raise ValueError("--request-rate: must be > 0 (inf sends all at once)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency: must be >= 1")


def _prompts(args: argparse.Namespace) -> list[str]:
    rng = random.Random(args.seed)
    if args.dataset:
        path = Path(args.dataset)
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if path.suffix == ".jsonl":
            lines = [str(json.loads(ln)["prompt"]) for ln in lines]
        if not lines:
            raise ValueError(f"--dataset: no prompts in {path}")
        return [lines[i % len(lines)] for i in range(args.num_requests)]
    return [" ".join(rng.choice(_WORDS) for _ in range(args.input_len)) for _ in range(args.num_requests)]


# ---------------------------------------------------------------------- HTTP
class _HttpClient:
    def __init__(self, args: argparse.Namespace, api_key: str | None):
        import httpx

        scheme = "https" if args.tls_ca else "http"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        verify: Any = ssl.create_default_context(cafile=args.tls_ca) if args.tls_ca else True
        self.client = httpx.AsyncClient(base_url=f"{scheme}://{args.host}:{args.port}", headers=headers,
                                        verify=verify, timeout=args.timeout,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        self.args = args

    async def model(self) -> str:
        r = await self.client.get("/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]

    async def run(self, res: RequestResult, prompt: str, model: str, t0: float) -> None:
        body = {"model": model, "prompt": prompt, "max_tokens": self.args.output_len, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": self.args.temperature,
                "ignore_eos": self.args.ignore_eos}
        last = None
        chunks = 0
        async with self.client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                now = time.perf_counter() - t0
                if msg.get("error"):
                    err = msg["error"]
                    res.error = f"stream error: {str(err.get('message', err) if isinstance(err, dict) else err)[:200]}"
                    return
                if msg.get("usage"):
                    res.prompt_tokens = msg["usage"].get("prompt_tokens", 0)
                    res.output_tokens = msg["usage"].get("completion_tokens", 0)
                if any(c.get("text") for c in msg.get("choices", [])):
                    chunks += 1
                    if last is None:
                        res.ttft = now - res.start
                    else:
                        res.itls.append(now - last)
                    last = now
        res.latency = time.perf_counter() - t0 - res.start
        res.output_tokens = res.output_tokens or chunks
        res.success = last is not None

    async def close(self) -> None:
        await self.client.aclose()


# ---------------------------------------------------------------------- gRPC
class _GrpcClient:
    def __init__(self, args: argparse.Namespace, api_key: str | None):
        import grpc

        from mindie_llm.server.proto import mindie_generation_pb2 as pb2
        from mindie_llm.server.proto import mindie_generation_pb2_grpc as pb2_grpc

        target = f"{args.host}:{args.port}"
        if args.tls_ca:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(args.tls_ca).read_bytes())
            self.channel = grpc.aio.secure_channel(target, creds)
        else:
            self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb2_grpc.GenerationServiceStub(self.channel)
        self.pb2 = pb2
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.args = args

    async def model(self) -> str:
        info = await self.stub.ModelInfo(self.pb2.ModelInfoRequest(), metadata=self.metadata, timeout=30)
        return info.model

    async def run(self, res: RequestResult, prompt: str, model: str, t0: float) -> None:
        import grpc

        pb2 = self.pb2
        request = pb2.GenerateRequest(model=model, text=prompt, sampling=pb2.SamplingParameters(
            max_tokens=self.args.output_len, temperature=self.args.temperature, ignore_eos=self.args.ignore_eos))
        last = None
        try:
            async for msg in self.stub.GenerateStream(request, metadata=self.metadata, timeout=self.args.timeout):
                now = time.perf_counter() - t0
                if msg.token_ids:
                    res.output_tokens += len(msg.token_ids)
                    if last is None:
                        res.ttft = now - res.start
                    else:
                        res.itls.append(now - last)
                    last = now
                if msg.finished:
                    res.prompt_tokens = msg.usage.prompt_tokens
        except grpc.aio.AioRpcError as e:
            res.error = f"{e.code().name}: {e.details()}"
            return
        res.latency = time.perf_counter() - t0 - res.start
        res.success = last is not None

    async def close(self) -> None:
        await self.channel.close()


# ---------------------------------------------------------------------- the run
async def _run(args: argparse.Namespace) -> tuple[list[RequestResult], float, str]:
    api_key = args.api_key or os.environ.get("MINDIE_API_KEY") or None
    client: Any = _HttpClient(args, api_key) if args.protocol == "http" else _GrpcClient(args, api_key)
    try:
        model = args.model or await client.model()
        prompts = _prompts(args)
        rng = random.Random(args.seed + 1)
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        results = [RequestResult(index=i) for i in range(len(prompts))]

        async def one(res: RequestResult, prompt: str, t0: float) -> None:
            async def go() -> None:
                res.start = time.perf_counter() - t0
                try:
                    await client.run(res, prompt, model, t0)
                except Exception as e:  # noqa: BLE001 - every request gets a result or an explicit error
                    res.error = f"{type(e).__name__}: {str(e)[:200]}"
            if sem is None:
                await go()
            else:
                async with sem:
                    await go()

        t0 = time.perf_counter()
        tasks = []
        for res, prompt in zip(results, prompts):
            tasks.append(asyncio.ensure_future(one(res, prompt, t0)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0, model
    finally:
        await client.close()


def run_benchmark(args: argparse.Namespace) -> tuple[list[RequestResult], float, str]:
    """Sends the requests; returns (one result per request, duration in seconds, model name)."""
    if args.port is None:
        args.port = 8000 if args.protocol == "http" else 8001
    _validate(args)
    return asyncio.run(_run(args))


def _pct(values: list[float], q: float) -> float:
    vals = sorted(v for v in values if not math.isnan(v))
    if not vals:
        return math.nan
    k = (len(vals) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """Throughput and latency statistics (milliseconds) over the successful requests."""
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    s: dict[str, Any] = {
        "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration, "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else math.nan,
        "output_throughput": out_tokens / duration if duration > 0 else math.nan,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else math.nan,
    }
    series = {"ttft": [r.ttft for r in ok], "tpot": [r.tpot for r in ok],
              "itl": [x for r in ok for x in r.itls], "e2el": [r.latency for r in ok]}
    for name, vals in series.items():
        ms = [v * 1000 for v in vals if not math.isnan(v)]
        s[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else math.nan
        for q in (50, 90, 99):
            s[f"p{q}_{name}_ms"] = _pct(ms, q)
    errors: dict[str, int] = {}
    for r in results:
        if not r.success:
            key = r.error.split(":")[0] or "no output"
            errors[key] = errors.get(key, 0) + 1
    s["errors"] = errors
    return s


def _print(s: dict[str, Any], args: argparse.Namespace, model: str) -> None:
    w = 50
    print(f"{' Serving Benchmark Result ':=^{w}}")
    rows = [("Protocol", args.protocol), ("Model", model), ("Request rate (req/s)", args.request_rate),
            ("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Benchmark duration (s)", f"{s['duration_s']:.2f}"), ("Total input tokens", s["total_input_tokens"]),
            ("Total generated tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}"),
            ("Keep-alive /health latency (ms)", f"{s.get('keepalive_health_ms', math.nan):.2f}"),
            ("Keep-alive 1-token latency (ms)", f"{s.get('keepalive_1tok_ms', math.nan):.2f}")]
    for k, v in rows:
        print(f"{k:<36}{v!s:>14}")
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for name, title in titles.items():
        print(f"{' ' + title + ' ':-^{w}}")
        for stat in ("mean", "p50", "p90", "p99"):
            label = "Median" if stat == "p50" else stat.capitalize() if stat == "mean" else stat.upper()
            print(f"{label + ' ' + name.upper() + ' (ms)':<36}{s[f'{stat}_{name}_ms']:>14.2f}")
    if s["errors"]:
        print(f"{' Errors ':-^{w}}")
        for k, v in sorted(s["errors"].items()):
            print(f"{k[:36]:<36}{v:>14}")
    print("=" * w)


def write_outputs(out_dir: str, results: list[RequestResult], summary: dict[str, Any]) -> None:
    """requests.csv, summary.json and plot.png under ``out_dir``."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "requests.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["index", "start_s", "success", "prompt_tokens", "output_tokens", "ttft_ms", "tpot_ms",
                    "mean_itl_ms", "e2e_latency_ms", "error"])
        for r in results:
            itl = statistics.fmean(r.itls) * 1000 if r.itls else math.nan
            w.writerow([r.index, f"{r.start:.6f}", int(r.success), r.prompt_tokens, r.output_tokens,
                        f"{r.ttft * 1000:.3f}", f"{r.tpot * 1000:.3f}", f"{itl:.3f}", f"{r.latency * 1000:.3f}",
                        r.error])
    (d / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    _plot(d / "plot.png", results)


def _plot(path: Path, results: list[RequestResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.success]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = {"TTFT": [r.ttft for r in ok], "TPOT": [r.tpot for r in ok],
              "ITL": [x for r in ok for x in r.itls], "E2E latency": [r.latency for r in ok]}
    for label, vals in series.items():
        ms = sorted(v * 1000 for v in vals if not math.isnan(v))
        if ms:
            ax1.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))], label=label)
    ax1.set_xscale("log")
    ax1.set_xlabel("latency (ms)")
    ax1.set_ylabel("fraction of requests / tokens")
    ax1.set_title("Latency CDFs")
    ax1.legend()
    ax1.grid(True, alpha=0.3)
    # Output tokens per second over time: the first token at start + ttft, the others spread by the ITLs.
    stamps = []
    for r in ok:
        t = r.start + r.ttft
        stamps.append(t)
        for gap in r.itls:
            t += gap
            stamps.append(t)
    if stamps:
        width = max(max(stamps) / 50, 0.05)
        bins = [0] * (int(max(stamps) / width) + 1)
        for t in stamps:
            bins[int(t / width)] += 1
        ax2.plot([i * width for i in range(len(bins))], [b / width for b in bins])
    ax2.set_xlabel("time since start (s)")
    ax2.set_ylabel("streamed chunks per second")
    ax2.set_title("Throughput over time")
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _unreachable(host: str, port: int, timeout: float = 3.0) -> str | None:
    """Why nothing listens on host:port (None when something does)."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__


def keepalive_latency_ms(args: argparse.Namespace, model: str, n: int = 10) -> tuple[float, float]:
    """Median latency (ms) on one kept-alive HTTP connection (what the openai and httpx clients
    do) of ``GET /health`` (the transport alone) and of a ``max_tokens=1`` completion; nan for
    gRPC or when it fails."""
    if args.protocol != "http":
        return math.nan, math.nan
    import httpx

    api_key = args.api_key or os.environ.get("MINDIE_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    scheme = "https" if args.tls_ca else "http"
    verify: Any = ssl.create_default_context(cafile=args.tls_ca) if args.tls_ca else True
    body = {"model": model, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
    health, one = [], []
    try:
        with httpx.Client(base_url=f"{scheme}://{args.host}:{args.port}", headers=headers, verify=verify,
                          timeout=args.timeout) as c:
            c.post("/v1/completions", json=body).raise_for_status()   # opens the connection
            for _ in range(2 * n):
                t0 = time.perf_counter()
                c.get("/health").raise_for_status()
                health.append((time.perf_counter() - t0) * 1000)
            for _ in range(n):
                t0 = time.perf_counter()
                c.post("/v1/completions", json=body).raise_for_status()
                one.append((time.perf_counter() - t0) * 1000)
    except Exception:  # noqa: BLE001 - benchmark rows, not a failure of the run
        return math.nan, math.nan
    return statistics.median(health), statistics.median(one)


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """Runs the benchmark; returns the exit code (0 if at least one request succeeded, 1 if none
    did, 2 for bad arguments). ``args`` is parsed options or a command line (``None``: sys.argv)."""
    if not isinstance(args, argparse.Namespace):
        args = add_arguments(argparse.ArgumentParser(prog="mindie-llm bench serve")).parse_args(args)
    if args.port is None:
        args.port = 8000 if args.protocol == "http" else 8001
    try:
        _validate(args)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    why = _unreachable(args.host, args.port)
    if why is not None:
        print(f"mindie-llm bench serve: no server at {args.host}:{args.port} ({why}); "
              "start one with `mindie-llm serve` or pass --host/--port")
        return 1
    results, duration, model = run_benchmark(args)
    summary = summarize(results, duration)
    summary["keepalive_health_ms"], summary["keepalive_1tok_ms"] = keepalive_latency_ms(args, model)
    _print(summary, args, model)
    if args.out:
        write_outputs(args.out, results, summary)
        print(f"wrote {Path(args.out) / 'requests.csv'}, summary.json and plot.png")
    return 0 if summary["completed"] > 0 else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
