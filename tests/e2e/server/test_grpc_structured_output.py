# SPDX-License-Identifier: Apache-2.0
"""Structured output over the native gRPC service (SamplingParameters.guided), on the real model.
Oracles: the regex / choice themselves; a schema that cannot match is INVALID_ARGUMENT naming
the field, before any stream message."""
from __future__ import annotations

import json

import grpc
import pytest

pytest.importorskip("llguidance")

from mindie_llm.server.grpc.generation_service import pb2  # noqa: E402
from mindie_llm.server.proto import mindie_generation_pb2_grpc as pb2_grpc  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def stub(server_factory):
    srv = server_factory({"server": {"http_port": -1}})
    return pb2_grpc.GenerationServiceStub(grpc.insecure_channel(srv.grpc_address))


def _req(guided, **kw):
    return pb2.GenerateRequest(text="The code is", sampling=pb2.SamplingParameters(
        max_tokens=12, temperature=0, guided=guided, **kw))


def test_regex_and_choice(stub):
    r = stub.Generate(_req(pb2.GuidedDecoding(regex="[0-9]{4}")), timeout=300)
    assert len(r.completions[0].text) == 4 and r.completions[0].text.isdigit()
    r = stub.Generate(_req(pb2.GuidedDecoding(choice=pb2.ChoiceList(choices=["up", "down"]))), timeout=300)
    assert r.completions[0].text in ("up", "down")
    texts = "".join(m.text for m in stub.GenerateStream(_req(pb2.GuidedDecoding(regex="[a-c]{3}")), timeout=300))
    assert len(texts) == 3 and set(texts) <= set("abc")


def test_unmatchable_schema_is_invalid_argument(stub):
    bad = json.dumps({"type": "object", "properties": {"a": {"type": "integer", "minimum": 3, "maximum": 1}},
                      "required": ["a"]})
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(_req(pb2.GuidedDecoding(json_schema=bad)), timeout=300)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.guided.json" in e.value.details()
