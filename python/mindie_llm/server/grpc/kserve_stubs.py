# SPDX-License-Identifier: Apache-2.0
"""The KServe ``inference.*`` message classes, loaded into a private descriptor pool.

Why: the official Triton client (``tritonclient.grpc``) registers the same fully qualified names
(``inference.ModelInferRequest``, ...) from its own ``grpc_service.proto`` in protobuf's default
pool, and a pool refuses a second definition of a name. Importing our generated
``kserve_grpc_service_pb2`` would make any process that also imports tritonclient fail (in either
order). So the serialized FileDescriptorProto that protoc embedded in the generated module is read
as a bytes literal (``ast.literal_eval``, nothing is executed) and added to a private pool, from
which the message classes are built. The wire format is the same either way.

``reflection_pool()`` is a private pool holding every descriptor the server exposes, for server
reflection. Must not import torch or the engine.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
from types import SimpleNamespace
from typing import Any

from google.protobuf import descriptor_pool, message_factory

__all__ = ["load_kserve_messages", "reflection_pool"]

_MODULE = "mindie_llm.server.proto.kserve_grpc_service_pb2"


def _serialized_descriptor(module: str) -> bytes:
    """The FileDescriptorProto that protoc embedded in a generated ``*_pb2.py``, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ImportError(f"{module} is missing; the gRPC stubs are generated at build time: run "
                          "`python setup.py build_ext --inplace` or `pip install -e .`")
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=spec.origin)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "AddSerializedFile" and node.args):
            data = ast.literal_eval(node.args[0])
            if isinstance(data, bytes):
                return data
    raise ImportError(f"{spec.origin}: no embedded descriptor found (unexpected protoc output)")


@functools.lru_cache(maxsize=1)
def _kserve_file() -> tuple[Any, Any]:
    pool = descriptor_pool.DescriptorPool()
    return pool, pool.AddSerializedFile(_serialized_descriptor(_MODULE))


@functools.lru_cache(maxsize=1)
def load_kserve_messages() -> SimpleNamespace:
    """A namespace like a generated ``_pb2`` module: ``DESCRIPTOR`` and one class per top-level
    message (nested messages are attributes of their parents)."""
    _, fd = _kserve_file()
    classes = {name: message_factory.GetMessageClass(desc) for name, desc in fd.message_types_by_name.items()}
    return SimpleNamespace(DESCRIPTOR=fd, **classes)


def reflection_pool(*modules: Any, include_kserve: bool = True) -> Any:
    """A private pool with the files of ``modules`` (generated ``_pb2`` modules, without imports of
    other files) plus the KServe file, so that reflection can describe every service."""
    pool = descriptor_pool.DescriptorPool()
    for mod in modules:
        pool.AddSerializedFile(mod.DESCRIPTOR.serialized_pb)
    if include_kserve:
        pool.AddSerializedFile(_serialized_descriptor(_MODULE))
    return pool
