# SPDX-License-Identifier: Apache-2.0
"""``mindie-llm serve``: one process serving HTTP (OpenAI) and gRPC from a YAML deployment.

Owns the command line (a positional MODEL and vLLM's flag names, each mapped to one YAML key),
start-up order (config -> ports -> model -> servers -> ready line), the one-line start-up errors
with a non-zero exit, the listening sockets (TCP_NODELAY), the periodic stats line, and shutdown:
on SIGTERM/SIGINT ``/ready`` turns 503, new requests are refused, in-flight ones finish (up to
``server.drain_timeout_s``); what is left is then aborted by the engine, each stream ending with a
final chunk (finish_reason "abort") and ``[DONE]``, and the process exits 0 within about a second.

Exit codes: 0 clean shutdown, 2 configuration error, 3 a port cannot be bound, 4 the model cannot
be loaded, 1 anything else. Must not import torch directly (the engine does).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["build_arg_parser", "load_config", "main"]

logger = logging.getLogger("mindie_llm.server")

EXIT_CONFIG, EXIT_PORT, EXIT_MODEL, EXIT_OTHER = 2, 3, 4, 1


class StartupError(Exception):
    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(message)


# vLLM's flag names for the common keys: flag -> (config key, type). The YAML stays the deployment
# format; a flag overrides its key (docs/configuration.md has the same table).
VLLM_FLAGS: dict[str, tuple[str, Any]] = {
    "--max-model-len": ("model.max_seq_len", int),
    "--tensor-parallel-size": ("parallel.tensor_parallel_size", int),
    "--served-model-name": ("model.served_model_name", str),
    "--dtype": ("model.dtype", str),
    "--api-key": ("server.api_key", str),
    "--max-num-seqs": ("scheduler.max_batch_size", int),
    "--max-num-batched-tokens": ("scheduler.max_prefill_tokens", int),
    "--enable-prefix-caching": ("cache.enable_prefix_caching", bool),
    "--quantization": ("model.quantization", str),
    "--gpu-memory-utilization": ("cache.gpu_memory_utilization", float),
    "--block-size": ("cache.cache_block_size", int),
    "--seed": ("model.seed", int),
    "--tokenizer": ("model.tokenizer", str),
    "--enable-chunked-prefill": ("scheduler.enable_chunked_prefill", bool),
    "--device": ("backend.device", str),
}
_SHORT = {"--tensor-parallel-size": "-tp", "--quantization": "-q"}
_VLLM_DTYPES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _dest(flag: str) -> str:
    return "vllm_" + flag.lstrip("-").replace("-", "_")


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mindie-llm serve",
                                description="Serve a model over HTTP (OpenAI-compatible) and gRPC. "
                                            "vLLM's flag names map to YAML keys (docs/configuration.md).")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="HF directory or .gguf file (as vLLM's positional model); also the served model name "
                        "unless --served-model-name or model.served_model_name says otherwise")
    p.add_argument("--config", "-c", default=None, help="deployment YAML (default: built-in defaults)")
    p.add_argument("--set", dest="set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one key of the YAML (repeatable), e.g. --set server.http_port=9000")
    p.add_argument("--model", default=None, help="the same as the positional MODEL")
    p.add_argument("--host", default=None, help="server.host")
    p.add_argument("--port", type=int, default=None, help="server.http_port")
    p.add_argument("--grpc-port", type=int, default=None, help="server.grpc_port")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    for flag, (key, typ) in VLLM_FLAGS.items():
        names = [flag, *([_SHORT[flag]] if flag in _SHORT else [])]
        if typ is bool:
            p.add_argument(*names, dest=_dest(flag), action=argparse.BooleanOptionalAction, default=None,
                           help=key)
        else:
            p.add_argument(*names, dest=_dest(flag), type=typ, default=None, help=key)
    return p


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The vLLM flags given, as {``section__key``: typed value} for ``EngineConfig.from_kwargs``."""
    out: dict[str, Any] = {}
    for flag, (key, _) in VLLM_FLAGS.items():
        v = getattr(args, _dest(flag), None)
        if v is None:
            continue
        if flag == "--dtype":
            v = _VLLM_DTYPES.get(v, v)
        out[key.replace(".", "__")] = v
    return out


def load_config(args: argparse.Namespace) -> Any:
    """The deployment from ``--config``, the ``--set`` overrides and the vLLM flags (in that order);
    raises ``ConfigError`` naming the key."""
    from mindie_llm.config import ConfigError, EngineConfig

    model = getattr(args, "model", None)
    tag = getattr(args, "model_tag", None)
    if tag is not None and model is not None and tag != model:
        raise ConfigError("model.path", f"given twice: positional {tag!r} and --model {model!r}")
    model = tag if tag is not None else model
    overrides = list(getattr(args, "set", None) or [])
    for attr, key in (("host", "server.host"), ("port", "server.http_port"), ("grpc_port", "server.grpc_port")):
        v = getattr(args, attr, None)
        if v is not None:
            overrides.append(f"{key}={v}")
    cfg = EngineConfig.from_yaml(args.config, overrides) if args.config else EngineConfig.from_overrides(overrides)
    kwargs = _flag_overrides(args)
    if model is not None:
        kwargs["model__path"] = model
        # vLLM's rule: the served name is the model argument as given, unless one is set.
        if "model__served_model_name" not in kwargs and cfg.model.served_model_name is None:
            kwargs["model__served_model_name"] = model
    return EngineConfig.from_kwargs(cfg, **kwargs) if kwargs else cfg


def _bind(host: str, port: int, what: str) -> socket.socket:
    """A listening TCP socket on host:port (port 0 = any free port).

    Created with the address's protocol (IPPROTO_TCP): asyncio sets TCP_NODELAY on accepted
    connections only for sockets whose ``proto`` says TCP; without it every response on a kept-alive
    connection waited ~40 ms for the peer's delayed ACK (Nagle). TCP_NODELAY is also set here,
    and Linux passes it on to accepted sockets.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StartupError(EXIT_CONFIG, f"server.host: cannot resolve {host!r} ({e.strerror})") from None
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(addr)
        sock.listen(1024)
    except OSError as e:
        sock.close()
        raise StartupError(EXIT_PORT, f"server.{what}: cannot listen on {host}:{port} ({e.strerror})") from None
    sock.setblocking(False)
    return sock


def _check_tls(cfg: Any) -> None:
    for key in ("tls_cert_file", "tls_key_file"):
        path = getattr(cfg.server, key)
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise StartupError(EXIT_CONFIG, f"server.{key}: cannot read {path!r} ({e.strerror})") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


@contextlib.contextmanager
def _no_signal_capture() -> Iterator[None]:
    yield


def _enable_logs(cfg: Any) -> None:
    """The access log and the stats line log at INFO whatever --log-level says, when switched on."""
    if cfg.server.access_log:
        logging.getLogger("mindie_llm.access").setLevel(logging.INFO)
    if cfg.server.stats_interval_s > 0:
        logging.getLogger("mindie_llm.stats").setLevel(logging.INFO)


async def _serve(cfg: Any, make_llm: Callable[[Any], Any] | None = None) -> int:
    """Serves ``cfg`` until a signal. ``make_llm(cfg)`` builds the AsyncLLM (default: load the
    model); tests pass one over a stand-in engine."""
    import uvicorn

    from mindie_llm.config import ConfigError
    from mindie_llm.engine.async_llm import AsyncLLM
    from mindie_llm.server.http.app import build_app
    from mindie_llm.server.http.connection import guarded_protocol
    from mindie_llm.server.metrics import ServerMetrics
    from mindie_llm.server.stats_log import run_stats_line

    scfg = cfg.server
    role = cfg.disaggregation.role
    if role in ("prefill", "decode"):   # PD instance: the internal service only (server/pd)
        from mindie_llm.server.pd.instance_service import serve_instance

        return await serve_instance(cfg)
    _check_tls(cfg)
    http_sock = _bind(scfg.host, scfg.http_port, "http_port") if scfg.http_port >= 0 else None
    if scfg.grpc_port > 0:
        # Fail before the (slow) model load if the gRPC port is taken; gRPC binds it again later.
        try:
            _bind(scfg.host, scfg.grpc_port, "grpc_port").close()
        except StartupError:
            if http_sock is not None:
                http_sock.close()
            raise
    grpc_server = None
    llm = None
    try:
        if scfg.grpc_port >= 0 and scfg.grpc_port == scfg.http_port and scfg.grpc_port != 0:
            raise StartupError(EXIT_CONFIG, "server.grpc_port: must differ from server.http_port")
        try:
            if role == "router":          # PD router: AsyncLLM-shaped front of the instances
                from mindie_llm.server.pd.router import PDRouter

                factory = PDRouter.from_config
            else:
                factory = make_llm or AsyncLLM.from_config
            llm = await asyncio.get_running_loop().run_in_executor(None, factory, cfg)
        except ConfigError:
            raise
        except (OSError, ValueError, RuntimeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StartupError(EXIT_MODEL, f"model: cannot load ({first})") from None
        cfg = llm.config
        metrics = ServerMetrics(llm)
        if role == "router":
            from mindie_llm.server.pd.metrics import install_pd_metrics

            install_pd_metrics(llm, metrics.registry)
        grpc_addr = "off"
        if scfg.grpc_port >= 0:
            from mindie_llm.server.grpc import build_grpc_server

            try:
                grpc_server = build_grpc_server(llm, cfg)
            except OSError as e:
                raise StartupError(EXIT_PORT, f"server.grpc_port: cannot listen on {scfg.host}:{scfg.grpc_port} "
                                   f"({e.strerror or e})") from None
            except (ValueError, RuntimeError) as e:
                raise StartupError(EXIT_PORT, f"server.grpc_port: {str(e).splitlines()[0]}") from None
            await grpc_server.start()
            grpc_addr = f"{scfg.host}:{getattr(grpc_server, 'bound_port', scfg.grpc_port)}"
        http_server = None
        http_addr = "off"
        http_task = None
        if http_sock is not None:
            app = build_app(llm, cfg, metrics)
            # The drain (below) happens before uvicorn is asked to stop, so its own graceful
            # shutdown only has to let the final chunks out: at most 1 s.
            ucfg = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                  ssl_certfile=scfg.tls_cert_file, ssl_keyfile=scfg.tls_key_file,
                                  http=guarded_protocol(scfg.header_timeout_s, scfg.max_connections),
                                  timeout_keep_alive=scfg.keep_alive_timeout_s,
                                  timeout_graceful_shutdown=1)
            http_server = uvicorn.Server(ucfg)
            http_server.capture_signals = _no_signal_capture  # type: ignore[method-assign]
            http_task = asyncio.ensure_future(http_server.serve(sockets=[http_sock]))
            while not http_server.started:
                if http_task.done():
                    http_task.result()
                    raise StartupError(EXIT_PORT, "server.http_port: the HTTP server did not start")
                await asyncio.sleep(0.01)
            scheme = "https" if scfg.tls_cert_file else "http"
            http_addr = f"{scheme}://{scfg.host}:{http_sock.getsockname()[1]}"

        stop, force = asyncio.Event(), asyncio.Event()

        def on_signal() -> None:  # the first signal drains; a second one stops waiting for the drain
            if stop.is_set():
                force.set()
            stop.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        if getattr(llm, "tokenizer", None) is None or not hasattr(llm.tokenizer, "encode"):
            print("mindie-llm: warning: the model has no tokenizer (no tokenizer.json beside the weights); "
                  "only token-id prompts can be served (set model.tokenizer to add one)", flush=True)
        print(f"mindie-llm ready: http={http_addr} grpc={grpc_addr} model={llm.model_name} "
              f"max_model_len={llm.max_model_len}", flush=True)
        stats_task = (asyncio.ensure_future(run_stats_line(llm, scfg.stats_interval_s))
                      if scfg.stats_interval_s > 0 else None)
        waiter = asyncio.ensure_future(stop.wait())

        async def workers_lost() -> str:    # a dead or hung tensor-parallel rank ends the server
            while llm.is_live() or not getattr(llm, "fatal_error", None):
                await asyncio.sleep(0.25)
            return llm.fatal_error

        lost = asyncio.ensure_future(workers_lost())
        watch = {waiter, lost} | ({http_task} if http_task else set())
        await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
        if lost.done():
            raise StartupError(EXIT_OTHER, lost.result())
        lost.cancel()
        if http_task is not None and http_task.done() and not waiter.done():
            http_task.result()
            raise StartupError(EXIT_OTHER, "the HTTP server stopped unexpectedly")

        # Drain: /ready -> 503 and new requests refused, in-flight ones finish.
        llm.begin_drain()
        print("mindie-llm draining: refusing new requests", flush=True)
        drain = asyncio.ensure_future(llm.wait_drained(scfg.drain_timeout_s))
        forced = asyncio.ensure_future(force.wait())
        await asyncio.wait({drain, forced}, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        drained = drain.done() and drain.result()
        drain.cancel()
        if not drained:
            # The engine aborts what is left; each stream ends with a final chunk
            # (finish_reason "abort") and [DONE], each gRPC stream with its final message.
            n = llm.abort_all()
            print(f"mindie-llm: drain ended (timeout or second signal); aborted {n} requests", flush=True)
            await llm.wait_drained(0.5)
        if stats_task is not None:
            stats_task.cancel()
        stopping = []
        if http_server is not None:
            http_server.should_exit = True
            stopping.append(http_task)
        if grpc_server is not None:
            stopping.append(grpc_server.stop(grace=0.5))
        await asyncio.gather(*stopping)
        grpc_server = None
        await llm.shutdown()
        llm = None
        print("mindie-llm stopped", flush=True)
        return 0
    finally:
        if http_sock is not None:
            http_sock.close()
        if grpc_server is not None:
            await grpc_server.stop(grace=None)
        if llm is not None:
            await llm.shutdown()


def main(argv: Sequence[str] | argparse.Namespace | None = None,
         make_llm: Callable[[Any], Any] | None = None) -> int:
    """Entry of ``mindie-llm serve``; returns the process exit code. ``make_llm``: see ``_serve``."""
    args = argv if isinstance(argv, argparse.Namespace) else build_arg_parser().parse_args(
        list(argv) if argv is not None else None)
    logging.basicConfig(level=getattr(logging, str(getattr(args, "log_level", "warning")).upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mindie_llm.config import ConfigError

    try:
        cfg = load_config(args)
    except ConfigError as e:
        print(f"mindie-llm: configuration error: {_one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    _enable_logs(cfg)
    try:
        return asyncio.run(_serve(cfg, make_llm))
    except StartupError as e:
        print(f"mindie-llm: error: {e}", file=sys.stderr, flush=True)
        return e.code
    except ConfigError as e:
        print(f"mindie-llm: configuration error: {_one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 0
    except Exception as e:  # noqa: BLE001 - one line, no traceback: start-up failures must read clearly
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"mindie-llm: error: {type(e).__name__}: {first}", file=sys.stderr, flush=True)
        return EXIT_OTHER


if __name__ == "__main__":
    sys.exit(main())
