# SPDX-License-Identifier: Apache-2.0
"""Builds the gRPC server: mindie.v1 GenerationService, KServe v2 GRPCInferenceService, the
standard grpc.health.v1 health service and server reflection, behind one API-key interceptor.

Owns binding (server.host:server.grpc_port, TLS from server.tls_cert_file / tls_key_file), message
size limits (server.max_request_body_bytes), request parsing (a message that does not parse is
INVALID_ARGUMENT, not INTERNAL) and authentication (every method but health needs the key when one
is configured). The caller (server/launcher.py) starts and stops the returned server.

Must not import torch or the model code.
"""
from __future__ import annotations

import asyncio
import errno
import logging
from typing import Any, AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mindie_llm.server.auth import api_key_matches, extract_api_key
from mindie_llm.server.grpc.errors import GENERIC_INTERNAL_MESSAGE

__all__ = ["build_grpc_server", "HEALTH_SERVICE_NAME"]

logger = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_HEALTH_PREFIX = f"/{HEALTH_SERVICE_NAME}/"
_UNAUTHENTICATED_MESSAGE = "missing or invalid API key: send 'authorization: Bearer <key>' or 'x-api-key: <key>'"
_WATCH_INTERVAL_S = 0.5
_MAX_SEND_BYTES = 64 << 20
_PASS_THROUGH = (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit)


# ---------------------------------------------------------------------- request parsing
def _reject_unknown_fields(msg: Any, path: str) -> None:
    """Unknown fields are refused rather than ignored: a client relying on a field this server does
    not know would otherwise get silently different behaviour. ``path`` names the message."""
    unknown = UnknownFieldSet(msg)
    if len(unknown):
        raise ValueError(f"{path}: unknown field number {unknown[0].field_number}")
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            items = [(f"{path}.{fd.name}[{k[:32]!r}]", v) for k, v in value.items() if hasattr(v, "ListFields")]
        elif fd.is_repeated:
            items = [(f"{path}.{fd.name}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(f"{path}.{fd.name}", value)]
        for sub_path, sub in items:
            _reject_unknown_fields(sub, sub_path)


def _parse(cls: Any, raw: bytes) -> Any:
    try:
        msg = cls.FromString(raw)
    except DecodeError:
        raise ValueError(f"request: not a valid {cls.DESCRIPTOR.full_name} message "
                         "(bad wire format, or a string field that is not valid UTF-8)") from None
    _reject_unknown_fields(msg, "request")
    return msg


def _bad_request(context: grpc.aio.ServicerContext, e: ValueError) -> Any:
    return context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


async def _internal(context: grpc.aio.ServicerContext, method: str) -> None:
    logger.exception("unexpected error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, GENERIC_INTERNAL_MESSAGE)


def _method_handler(fn: Callable, method: Any, pb2: Any) -> grpc.RpcMethodHandler:
    """A handler taking raw bytes, so that parse errors become INVALID_ARGUMENT; any unexpected
    exception becomes INTERNAL with a generic message (never the exception text)."""
    req_cls = getattr(pb2, method.input_type.name)
    resp_cls = getattr(pb2, method.output_type.name)
    ser = resp_cls.SerializeToString
    name = method.full_name
    if method.client_streaming:
        async def stream_in(raw_iter: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async def parsed() -> AsyncIterator[Any]:
                async for raw in raw_iter:
                    yield _parse(req_cls, raw)

            try:
                async for resp in fn(parsed(), context):
                    yield resp
            except _PASS_THROUGH:
                raise
            except Exception:  # noqa: BLE001
                await _internal(context, name)

        assert method.server_streaming, name
        return grpc.stream_stream_rpc_method_handler(stream_in, response_serializer=ser)
    if method.server_streaming:
        async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                req = _parse(req_cls, raw)
            except ValueError as e:
                await _bad_request(context, e)
            try:
                async for resp in fn(req, context):
                    yield resp
            except _PASS_THROUGH:
                raise
            except Exception:  # noqa: BLE001
                await _internal(context, name)

        return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=ser)

    async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            req = _parse(req_cls, raw)
        except ValueError as e:
            await _bad_request(context, e)
        try:
            return await fn(req, context)
        except _PASS_THROUGH:
            raise
        except Exception:  # noqa: BLE001
            await _internal(context, name)

    return grpc.unary_unary_rpc_method_handler(unary, response_serializer=ser)


def _generic_handler(servicer: Any, pb2: Any, service_name: str) -> grpc.GenericRpcHandler:
    service = pb2.DESCRIPTOR.services_by_name[service_name]
    handlers = {m.name: _method_handler(getattr(servicer, m.name), m, pb2) for m in service.methods}
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


# ---------------------------------------------------------------------- health
class _HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: SERVING while the engine is live and ready (not starting, draining or
    stalled), NOT_SERVING otherwise; the overall status is the empty service name."""

    def __init__(self, async_llm: Any, service_names: list[str]):
        self.llm = async_llm
        self.names = {"", *service_names}

    def _status(self) -> int:
        ok = bool(self.llm.is_live()) and bool(self.llm.is_ready())
        return health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.service not in self.names:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"service: unknown service {request.service[:128]!r}")
        return health_pb2.HealthCheckResponse(status=self._status())

    async def List(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        status = self._status()
        return health_pb2.HealthListResponse(
            statuses={n: health_pb2.HealthCheckResponse(status=status) for n in sorted(self.names)})

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if request.service not in self.names:
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return
        last = None
        while True:
            status = self._status()
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            await asyncio.sleep(_WATCH_INTERVAL_S)


# ---------------------------------------------------------------------- auth
def _deny_handler(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that fails with UNAUTHENTICATED."""
    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED_MESSAGE)

    async def deny_stream(_request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED_MESSAGE)
        yield b""  # pragma: no cover - abort raises

    request_streaming = handler is not None and handler.request_streaming
    response_streaming = handler is not None and handler.response_streaming
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream)
    return grpc.unary_unary_rpc_method_handler(deny)


class _ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Checks the API key (constant time) on every method except grpc.health.v1."""

    def __init__(self, expected: str):
        self.expected = expected

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        method = details.method or ""
        if method.startswith(_HEALTH_PREFIX):
            return await continuation(details)
        md = {}
        for k, v in details.invocation_metadata or ():
            md.setdefault(k.lower(), v if isinstance(v, str) else None)
        key = extract_api_key(md.get("authorization"), md.get("x-api-key"))
        if api_key_matches(key, self.expected):
            return await continuation(details)
        return _deny_handler(await continuation(details))


# ---------------------------------------------------------------------- build
def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{key}: cannot read {path!r}: {e.strerror}") from None


def build_grpc_server(async_llm: Any, config: Any, *, enable_kserve: bool = True) -> grpc.aio.Server:
    """A grpc.aio server bound to ``server.host:server.grpc_port`` (TLS when configured), not yet
    started. The bound port (useful with grpc_port=0) is ``server.bound_port``.

    Call it on the event loop that will run the server (grpc.aio binds the server to it).
    ``enable_kserve=False`` leaves out the KServe service.
    Raises ValueError for unreadable TLS files and OSError(EADDRINUSE) when the port cannot be bound.
    """
    from grpc_reflection.v1alpha import reflection, reflection_pb2

    from mindie_llm.server.grpc.generation_service import SERVICE_NAME as GEN_NAME
    from mindie_llm.server.grpc.generation_service import GenerationServicer
    from mindie_llm.server.grpc.generation_service import pb2 as gen_pb2
    from mindie_llm.server.grpc.kserve_stubs import reflection_pool

    scfg = config.server
    if scfg.grpc_port < 0:
        raise ValueError("server.grpc_port: gRPC is off (-1); nothing to build")
    interceptors = []
    key = scfg.resolved_api_key()
    if key:
        interceptors.append(_ApiKeyInterceptor(key))
    options = [
        ("grpc.max_receive_message_length", int(scfg.max_request_body_bytes)),
        ("grpc.max_send_message_length", _MAX_SEND_BYTES),
        ("grpc.so_reuseport", 0),   # a port in use must fail to bind, not be shared
    ]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    handlers = [_generic_handler(GenerationServicer(async_llm, config), gen_pb2, "GenerationService")]
    names = [GEN_NAME]
    if enable_kserve:
        from mindie_llm.server.grpc.kserve_service import SERVICE_NAME as KSERVE_NAME
        from mindie_llm.server.grpc.kserve_service import KServeServicer
        from mindie_llm.server.grpc.kserve_service import pb2 as kserve_pb2

        handlers.append(_generic_handler(KServeServicer(async_llm, config), kserve_pb2, "GRPCInferenceService"))
        names.append(KSERVE_NAME)
    server.add_generic_rpc_handlers(tuple(handlers))
    health_pb2_grpc.add_HealthServicer_to_server(_HealthServicer(async_llm, names), server)
    # Reflection reads a private pool: the KServe descriptors are not in the default one.
    pool = reflection_pool(gen_pb2, health_pb2, reflection_pb2, include_kserve=enable_kserve)
    reflection.enable_server_reflection([*names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server, pool=pool)

    address = _address(scfg.host, scfg.grpc_port)
    try:
        if scfg.tls_cert_file and scfg.tls_key_file:
            creds = grpc.ssl_server_credentials(
                [(_read(scfg.tls_key_file, "server.tls_key_file"), _read(scfg.tls_cert_file, "server.tls_cert_file"))])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(errno.EADDRINUSE, f"server.grpc_port: cannot bind gRPC to {address} (in use or not available)")
    server.bound_port = port  # type: ignore[attr-defined]
    logger.info("gRPC bound to %s (tls=%s, auth=%s)", _address(scfg.host, port),
                bool(scfg.tls_cert_file), bool(key))
    return server
