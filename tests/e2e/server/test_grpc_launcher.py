# SPDX-License-Identifier: Apache-2.0
"""gRPC through ``mindie-llm serve`` (the launcher, the real default model, started by the shared
``server_factory`` fixture): the README's gRPC call, tritonclient, the API key from the environment on every service
but health, and drain on SIGTERM (in-flight streams finish, new requests get UNAVAILABLE, health
turns NOT_SERVING, exit code 0), and a burst of 200 requests over a queue of 8.

Oracles: a stream started before SIGTERM with ignore_eos delivers exactly max_tokens tokens and ends
with finish reason LENGTH; status codes as the issue specifies.
"""
from __future__ import annotations

import signal
import threading
import time

import grpc
import numpy as np
import pytest

pb2 = pytest.importorskip("mindie_llm.server.proto.mindie_generation_pb2")
pb2_grpc = pytest.importorskip("mindie_llm.server.proto.mindie_generation_pb2_grpc")
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

_KEY = "grpc-e2e-key"
_AUTH = (("authorization", f"Bearer {_KEY}"),)


@pytest.fixture(scope="module")
def served(server_factory):
    """(process, grpc port) of ``mindie-llm serve`` with an API key from the environment."""
    srv = server_factory({"scheduler": {"max_queued_requests": 8}}, env={"MINDIE_API_KEY": _KEY})
    return srv.proc, int(srv.grpc_address.rsplit(":", 1)[1])


def _req(**sampling) -> "pb2.GenerateRequest":
    return pb2.GenerateRequest(text="Write a haiku about the sea.", sampling=pb2.SamplingParameters(**sampling))


def test_readme_grpc_call_with_the_key(served):
    _, port = served
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb2_grpc.GenerationServiceStub(ch)
        resp = stub.Generate(pb2.GenerateRequest(text="Hello, my name is",
                                                 sampling=pb2.SamplingParameters(max_tokens=4, temperature=0.0)),
                             metadata=_AUTH, timeout=120)
        assert resp.completions[0].token_ids and resp.model == "SmolLM2-135M-Instruct"


def test_key_required_everywhere_but_health(served):
    _, port = served
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb2_grpc.GenerationServiceStub(ch)
        for md in ((), (("authorization", "Bearer nope"),)):
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfo(pb2.ModelInfoRequest(), metadata=md, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_tritonclient_against_the_launcher(served):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    _, port = served
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    headers = {"authorization": f"Bearer {_KEY}"}
    assert c.is_server_ready(headers=headers) and c.is_model_ready("SmolLM2-135M-Instruct", headers=headers)
    inp = grpcclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"Hello, my name is"], dtype=np.object_))
    res = c.infer("SmolLM2-135M-Instruct", [inp], parameters={"max_tokens": 4, "temperature": "0"}, headers=headers)
    assert res.as_numpy("text_output")[0].decode()
    c.close()


def test_burst_of_200_over_a_queue_of_8(served):
    """RESOURCE_EXHAUSTED for what does not fit, before any stream message; the admitted ones
    complete; the server stays up."""
    _, port = served
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb2_grpc.GenerationServiceStub(ch)
        calls = [stub.Generate.future(_req(max_tokens=2, temperature=0.0), metadata=_AUTH, timeout=300)
                 for _ in range(150)]
        streams = [stub.GenerateStream(_req(max_tokens=2), metadata=_AUTH, timeout=300) for _ in range(50)]
        ok = exhausted = 0
        for f in calls:
            try:
                assert len(f.result().completions[0].token_ids) >= 1
                ok += 1
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                exhausted += 1
        for s in streams:
            got = []
            try:
                got.extend(s)
                assert got[-1].finished
                ok += 1
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not got, e.details()
                exhausted += 1
        assert ok + exhausted == 200 and ok >= 1 and exhausted >= 1
        assert stub.Generate(_req(max_tokens=1), metadata=_AUTH, timeout=120).completions[0].token_ids


def test_sigterm_drains_in_flight_streams_and_exits_zero(served):
    """Runs last in this module: it stops the server."""
    proc, port = served
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb2_grpc.GenerationServiceStub(ch)
        stream = stub.GenerateStream(_req(max_tokens=48, temperature=0.9, seed=11, ignore_eos=True),
                                     metadata=_AUTH, timeout=300)
        msgs = [next(stream)]   # in flight
        rest: list = []
        reader = threading.Thread(target=lambda: rest.extend(stream), daemon=True)
        reader.start()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(_req(max_tokens=2), metadata=_AUTH, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        reader.join(300)
        msgs += rest
    # ignore_eos + max_tokens: the drained stream must deliver exactly 48 tokens and end normally.
    assert msgs[-1].finished and msgs[-1].finish_reason == pb2.FINISH_REASON_LENGTH
    assert sum(len(m.token_ids) for m in msgs) == 48
    assert proc.wait(120) == 0
