# SPDX-License-Identifier: Apache-2.0
"""Proto hygiene of server/proto, and wire compatibility of the KServe proto with the official one.

Oracle for compatibility: the descriptors that ship inside ``tritonclient[grpc]`` (compiled from
triton-inference-server/common grpc_service.proto). Our proto is compiled with grpcio-tools into a
FileDescriptorSet (never loaded into a descriptor pool, so it cannot clash with tritonclient's).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

import mindie_llm

protoc = pytest.importorskip("grpc_tools.protoc")

PROTO_DIR = Path(mindie_llm.__file__).parent / "server" / "proto"
PROTOS = sorted(PROTO_DIR.glob("*.proto"))
_FIELD = re.compile(r"^\s*(optional\s+|repeated\s+)?(map<[^>]+>|[\w.]+)\s+\w+\s*=\s*\d+\s*;")
_ENUM_VALUE = re.compile(r"^\s*(\w+)\s*=\s*(\d+)\s*;")


def _compile(proto: Path, tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    out = tmp_path / (proto.stem + ".pb")
    assert protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--descriptor_set_out={out}",
                        str(proto)]) == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return fds.file[-1]


def test_both_protos_exist():
    assert {p.name for p in PROTOS} >= {"mindie_generation.proto", "kserve_grpc_service.proto"}


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_every_field_service_and_rpc_is_documented(proto):
    lines = proto.read_text().splitlines()
    assert lines[0].startswith("// SPDX-License-Identifier: Apache-2.0")
    undocumented = []
    for i, line in enumerate(lines):
        s = line.strip()
        is_decl = (_FIELD.match(line) or s.startswith(("rpc ", "message ", "service ", "enum "))
                   or (_ENUM_VALUE.match(line) and not s.startswith("//")))
        if is_decl and not lines[i - 1].strip().startswith("///"):
            undocumented.append(f"{proto.name}:{i + 1}: {s}")
    assert not undocumented, "\n".join(undocumented)


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_enum_zero_values_are_unspecified_and_fields_unique(proto, tmp_path):
    fd = _compile(proto, tmp_path)

    def walk(messages):
        for m in messages:
            yield m
            yield from walk(m.nested_type)

    for e in [*fd.enum_type, *(e for m in walk(fd.message_type) for e in m.enum_type)]:
        zero = [v.name for v in e.value if v.number == 0]
        assert zero and zero[0].endswith("_UNSPECIFIED"), e.name
    for m in walk(fd.message_type):
        numbers = [f.number for f in m.field]
        assert len(numbers) == len(set(numbers)), m.name


def test_native_package_and_service(tmp_path):
    fd = _compile(PROTO_DIR / "mindie_generation.proto", tmp_path)
    assert fd.package == "mindie.v1"
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in fd.service[0].method}
    assert fd.service[0].name == "GenerationService"
    assert methods == {"Generate": (False, False), "GenerateStream": (False, True), "Tokenize": (False, False),
                       "Detokenize": (False, False), "ModelInfo": (False, False)}


def test_kserve_proto_matches_the_official_one(tmp_path):
    """Same package, service, method shapes, message names, field names, numbers, types and labels
    as the protocol compiled into tritonclient."""
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    official = descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(official)
    ours = _compile(PROTO_DIR / "kserve_grpc_service.proto", tmp_path)
    assert ours.package == official.package == "inference"

    def messages(fd):
        out = {}

        def add(prefix, ms):
            for m in ms:
                name = f"{prefix}{m.name}"
                out[name] = {f.name: (f.number, f.type, f.label, f.type_name, f.oneof_index if f.HasField(
                    "oneof_index") else None) for f in m.field}
                add(name + ".", m.nested_type)

        add("", fd.message_type)
        return out

    theirs, mine = messages(official), messages(ours)
    assert mine, "no messages compiled"
    for name, fields in mine.items():
        assert name in theirs, f"{name} is not in the official proto"
        assert fields == theirs[name], name
    off_methods = {m.name: m for m in official.service[0].method}
    assert ours.service[0].name == official.service[0].name == "GRPCInferenceService"
    for m in ours.service[0].method:
        o = off_methods[m.name]
        assert (m.input_type, m.output_type, m.client_streaming, m.server_streaming) == \
            (o.input_type, o.output_type, o.client_streaming, o.server_streaming), m.name
