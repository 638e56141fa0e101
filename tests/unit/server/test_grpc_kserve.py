# SPDX-License-Identifier: Apache-2.0
"""The KServe v2 / Triton GRPCInferenceService, driven by the official ``tritonclient[grpc]``
client, against a server process running the fake engine of test_grpc_server.py.

Oracle: the fake engine's rule (``expected_text`` in test_grpc_server.py), computable by hand.
The server runs in its own process, as a real deployment does (SIGTERM exits it with code 0).
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
import grpc  # noqa: E402
from tritonclient.grpc import service_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from mindie_llm.server.grpc.kserve_params import decode_request  # noqa: E402

pytestmark = pytest.mark.timeout(180)

MODEL = "fake-model"
_SERVER_SCRIPT = Path(__file__).with_name("test_grpc_server.py")


def expected_text(prompt: str, max_tokens: int) -> str:
    """The fake engine's rule (see test_grpc_server.py)."""
    last, out = ord(prompt[-1]) % 256, []
    for _ in range(max_tokens):
        last = (last + 1) % 26 + 97
        out.append(chr(last))
    return "".join(out)


def _start(*args: str) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen([sys.executable, str(_SERVER_SCRIPT), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError("fake server did not start: " + proc.stderr.read()[-2000:])
    return proc, int(line.split()[1])


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def server():
    proc, port = _start()
    yield port
    _stop(proc)


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server}")
    yield c
    c.close()


def text_input(prompt: str | bytes) -> "grpcclient.InferInput":
    data = prompt.encode() if isinstance(prompt, str) else prompt
    inp = grpcclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([data], dtype=np.object_))
    return inp


def out_text(result) -> str:
    return result.as_numpy("text_output")[0].decode("utf-8")


# ---------------------------------------------------------------------- happy paths
def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and not client.is_model_ready("other")
    meta = client.get_server_metadata()
    assert meta.name == "mindie-llm"
    mm = client.get_model_metadata(MODEL)
    assert mm.name == MODEL and [i.name for i in mm.inputs][0] == "text_input"
    assert {"stream", "sampling_parameters", "max_tokens", "temperature"} <= {i.name for i in mm.inputs}
    assert [o.name for o in mm.outputs] == ["text_output"]


def test_infer_matches_the_engine_rule(client):
    res = client.infer(MODEL, [text_input("abc")], parameters={"max_tokens": 6, "temperature": "0"})
    assert out_text(res) == expected_text("abc", 6)
    params = res.get_response().parameters
    assert params["finish_reason"].string_param == "length"
    assert params["completion_tokens"].int64_param == 6 and params["prompt_tokens"].int64_param == 3


def test_sampling_parameters_tensor(client):
    sp = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    sp.set_data_from_numpy(np.array([json.dumps({"max_tokens": 4, "top_p": 0.9}).encode()], dtype=np.object_))
    res = client.infer(MODEL, [text_input("zz"), sp])
    assert out_text(res) == expected_text("zz", 4)


def _stream(client, requests: list[tuple[str, dict]], empty_final: bool = False) -> dict[str, list]:
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        for rid, params in requests:
            client.async_stream_infer(MODEL, [text_input(params.pop("prompt"))], request_id=rid,
                                      parameters=params, enable_empty_final_response=empty_final)
        by_id: dict[str, list] = {rid: [] for rid, _ in requests}
        done = 0
        while done < len(requests):
            result, error = got.get(timeout=60)
            if error is not None:
                by_id.setdefault("errors", []).append(str(error))
                done += 1
                continue
            resp = result.get_response()
            by_id[resp.id].append(resp)
            if resp.parameters["triton_final_response"].bool_param:
                done += 1
    finally:
        client.stop_stream()
    return by_id


def test_stream_infer_deltas_concatenate_to_the_unary_text(client):
    unary = out_text(client.infer(MODEL, [text_input("mn")], parameters={"max_tokens": 9, "seed": 7}))
    by_id = _stream(client, [("a", {"prompt": "mn", "max_tokens": 9, "seed": 7}),
                             ("b", {"prompt": "k", "max_tokens": 3})])
    texts = ["".join(r.raw_output_contents[0][4:].decode() for r in by_id[k]) for k in ("a", "b")]
    assert texts == [unary, expected_text("k", 3)]
    assert len(by_id["a"]) >= 2, "one response per delta"
    assert by_id["a"][-1].parameters["finish_reason"].string_param == "length"


def test_stream_infer_with_an_empty_final_response(client):
    by_id = _stream(client, [("e", {"prompt": "ab", "max_tokens": 4})], empty_final=True)
    *data, final = by_id["e"]
    assert not final.outputs and final.parameters["triton_final_response"].bool_param
    assert final.parameters["completion_tokens"].int64_param == 4
    assert not any(r.parameters["triton_final_response"].bool_param for r in data)
    assert "".join(r.raw_output_contents[0][4:].decode() for r in data) == expected_text("ab", 4)


def test_stream_error_of_one_request_keeps_the_stream(client):
    by_id = _stream(client, [("bad", {"prompt": "x", "max_tokens": 0}), ("good", {"prompt": "x", "max_tokens": 2})])
    assert any("max_tokens" in e for e in by_id["errors"])
    assert "".join(r.raw_output_contents[0][4:].decode() for r in by_id["good"]) == expected_text("x", 2)


def test_stream_false_gives_one_response(client):
    by_id = _stream(client, [("one", {"prompt": "q", "max_tokens": 5, "stream": False})])
    assert len(by_id["one"]) == 1
    assert by_id["one"][0].raw_output_contents[0][4:].decode() == expected_text("q", 5)


def test_cancelled_stream_aborts_its_requests():
    """tritonclient's stop_stream(cancel_requests=True) cancels the RPC: every request on it is
    aborted and the KV blocks return (seen through mindie.v1 ModelInfo on the same server)."""
    from mindie_llm.server.proto import mindie_generation_pb2 as gpb2
    from mindie_llm.server.proto import mindie_generation_pb2_grpc as gpb2_grpc

    proc, port = _start("--step-delay", "0.01")
    try:
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            info = gpb2_grpc.GenerationServiceStub(ch).ModelInfo
            baseline = info(gpb2.ModelInfoRequest(), timeout=10).num_free_kv_blocks
            got: queue.Queue = queue.Queue()
            c.start_stream(callback=lambda result, error: got.put((result, error)))
            for i in range(16):
                c.async_stream_infer(MODEL, [text_input(f"long {i}")], request_id=str(i),
                                     parameters={"max_tokens": 400})
            seen: set[str] = set()
            while len(seen) < 16:
                result, error = got.get(timeout=30)
                assert error is None, error
                seen.add(result.get_response().id)
            assert info(gpb2.ModelInfoRequest(), timeout=10).num_free_kv_blocks < baseline
            c.stop_stream(cancel_requests=True)
            def free() -> int:
                return info(gpb2.ModelInfoRequest(), timeout=10).num_free_kv_blocks

            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and free() != baseline:
                time.sleep(0.05)
            assert free() == baseline
        c.close()
    finally:
        _stop(proc)


# ---------------------------------------------------------------------- malformed requests
_I = grpc.StatusCode.INVALID_ARGUMENT


def _req(prompt: bytes | None = b"hello", *, params: dict | None = None, model: str = MODEL,
         datatype: str = "BYTES", shape=(1,), name: str = "text_input", raw: bytes | None = None,
         extra_inputs=(), outputs=()) -> service_pb2.ModelInferRequest:
    r = service_pb2.ModelInferRequest(model_name=model)
    if prompt is not None:
        t = r.inputs.add(name=name, datatype=datatype, shape=list(shape))
        r.raw_input_contents.append(raw if raw is not None else _bytes1(prompt))
        del t
    for inp, content in extra_inputs:
        r.inputs.append(inp)
        r.raw_input_contents.append(content)
    for o in outputs:
        r.outputs.add(name=o)
    for k, v in (params or {}).items():
        if isinstance(v, bool):
            r.parameters[k].bool_param = v
        elif isinstance(v, int):
            r.parameters[k].int64_param = v
        elif isinstance(v, float):
            r.parameters[k].double_param = v
        else:
            r.parameters[k].string_param = v
    return r


def _tensor(name: str, datatype: str, shape=(1,)) -> service_pb2.ModelInferRequest.InferInputTensor:
    return service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(shape))


def _bytes1(b: bytes) -> bytes:
    return len(b).to_bytes(4, "little") + b


MALFORMED = [
    ("no-inputs", _req(None), _I, "text_input"),
    ("empty-prompt", _req(b""), _I, "text_input"),
    ("invalid-utf8", _req(b"ab\xff\xfe"), _I, "UTF-8"),
    ("wrong-datatype", _req(b"hi", datatype="INT32"), _I, "datatype"),
    ("batch-of-two", _req(b"hi", shape=(2,)), _I, "shape"),
    ("negative-shape", _req(b"hi", shape=(-1,)), _I, "shape"),
    ("truncated-bytes", _req(b"hi", raw=b"\x05\x00\x00\x00ab"), _I, "text_input"),
    ("short-length-prefix", _req(b"hi", raw=b"\x01\x00"), _I, "text_input"),
    ("two-elements-in-raw", _req(b"hi", raw=_bytes1(b"a") + _bytes1(b"b")), _I, "text_input"),
    ("unknown-input", _req(b"hi", name="prompt"), _I, "inputs"),
    ("unknown-model", _req(model="gpt-9"), grpc.StatusCode.NOT_FOUND, "model_name"),
    ("unknown-output", _req(outputs=["logits"]), _I, "outputs"),
    ("max-tokens-zero", _req(params={"max_tokens": 0}), _I, "max_tokens"),
    ("max-tokens-negative", _req(params={"max_tokens": -5}), _I, "max_tokens"),
    ("max-tokens-huge", _req(params={"max_tokens": 1 << 62}), _I, "max_tokens"),
    ("max-tokens-not-a-number", _req(params={"max_tokens": "lots"}), _I, "max_tokens"),
    ("max-tokens-bool", _req(params={"max_tokens": True}), _I, "max_tokens"),
    ("temperature-negative", _req(params={"temperature": -1.0}), _I, "temperature"),
    ("temperature-nan", _req(params={"temperature": "nan"}), _I, "temperature"),
    ("temperature-text", _req(params={"temperature": "hot"}), _I, "temperature"),
    ("top-p-zero", _req(params={"top_p": 0.0}), _I, "top_p"),
    ("top-k-below", _req(params={"top_k": -7}), _I, "top_k"),
    ("presence-penalty", _req(params={"presence_penalty": 9.0}), _I, "presence_penalty"),
    ("repetition-penalty", _req(params={"repetition_penalty": 0.0}), _I, "repetition_penalty"),
    ("seed-out-of-range", _req(params={"seed": str(1 << 70)}), _I, "seed"),
    ("n-two", _req(params={"n": 2}), _I, "n"),
    ("too-many-stops", _req(params={"stop": json.dumps([f"s{i}" for i in range(40)])}), _I, "stop"),
    ("stop-not-strings", _req(extra_inputs=[(_tensor("sampling_parameters", "BYTES"), _bytes1(b'{"stop": [1]}'))]),
     _I, "stop"),
    ("stop-token-ids-json", _req(params={"stop_token_ids": "{nope"}), _I, "stop_token_ids"),
    ("unknown-parameter", _req(params={"frobnicate": 1}), _I, "frobnicate"),
    ("sequence-id", _req(params={"sequence_id": 3}), _I, "sequence_id"),
    ("timeout-param", _req(params={"timeout": 10}), _I, "timeout"),
    ("stream-on-unary", _req(params={"stream": True}), _I, "stream"),
    ("prompt-too-long", _req(b"y" * 600), _I, "max_tokens"),
    ("sampling-json-invalid", _req(extra_inputs=[(_tensor("sampling_parameters", "BYTES"), _bytes1(b"{x"))]), _I,
     "sampling_parameters"),
    ("sampling-json-nested", _req(extra_inputs=[(_tensor("sampling_parameters", "BYTES"),
                                                 _bytes1(b"[" * 5000 + b"]" * 5000))]), _I, "sampling_parameters"),
    ("sampling-json-unknown-key", _req(extra_inputs=[(_tensor("sampling_parameters", "BYTES"),
                                                      _bytes1(b'{"best_of": 3}'))]), _I, "best_of"),
    ("stream-tensor-wrong-type", _req(extra_inputs=[(_tensor("stream", "INT32"), b"\x01\x00\x00\x00")]), _I,
     "stream"),
    ("option-tensor-two-elements", _req(extra_inputs=[(_tensor("max_tokens", "INT32", shape=(2,)), b"\x01" * 8)]),
     _I, "max_tokens"),
    ("option-tensor-nan", _req(extra_inputs=[(_tensor("temperature", "FP32"), b"\x00\x00\xc0\x7f")]), _I,
     "temperature"),
    ("raw-count-mismatch", service_pb2.ModelInferRequest(model_name=MODEL, inputs=[_tensor("text_input", "BYTES")],
                                                         raw_input_contents=[b"", b""]), _I, "raw_input_contents"),
    ("oversized", _req(b"z" * (1 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
]


def test_malformed_table_size():
    assert len(MALFORMED) >= 30


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_request_is_rejected_naming_the_field(server, client, case):
    _, request, code, words = case
    with grpc.insecure_channel(f"127.0.0.1:{server}") as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as e:
            call(request.SerializeToString(), timeout=30)
    assert e.value.code() == code, e.value.details()
    assert words in (e.value.details() or "")
    assert "Traceback" not in (e.value.details() or "")
    assert out_text(client.infer(MODEL, [text_input("ok")], parameters={"max_tokens": 2})) == expected_text("ok", 2)


def test_garbage_and_invalid_utf8_model_name(server, client):
    with grpc.insecure_channel(f"127.0.0.1:{server}") as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for raw in (b"\xff\xff\xff", b"\x0a\x02\xff\xfe"):   # bad wire format; model_name not UTF-8
            with pytest.raises(grpc.RpcError) as e:
                call(raw, timeout=10)
            assert e.value.code() == _I and "request" in e.value.details()


# ---------------------------------------------------------------------- auth
def test_api_key_on_every_kserve_method():
    proc, port = _start("--api-key", "k3y")
    try:
        methods = {
            "ServerLive": service_pb2.ServerLiveRequest(), "ServerReady": service_pb2.ServerReadyRequest(),
            "ModelReady": service_pb2.ModelReadyRequest(name=MODEL),
            "ServerMetadata": service_pb2.ServerMetadataRequest(),
            "ModelMetadata": service_pb2.ModelMetadataRequest(name=MODEL),
            "ModelInfer": _req(params={"max_tokens": 1}),
        }
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            for m, r in methods.items():
                call = ch.unary_unary(f"/inference.GRPCInferenceService/{m}")
                for md in ((), (("authorization", "Bearer nope"),)):
                    with pytest.raises(grpc.RpcError) as e:
                        call(r.SerializeToString(), timeout=10, metadata=md)
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, m
                assert call(r.SerializeToString(), timeout=10, metadata=(("x-api-key", "k3y"),))
        ok = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert ok.is_server_live(headers={"authorization": "Bearer k3y"})
        with pytest.raises(InferenceServerException):
            ok.is_server_live()
        errors: queue.Queue = queue.Queue()
        ok.start_stream(callback=lambda result, error: errors.put(error), headers={"authorization": "Bearer bad"})
        try:
            ok.async_stream_infer(MODEL, [text_input("a")], parameters={"max_tokens": 1})
        except InferenceServerException:
            pass   # the server may end the stream before the first request is written
        assert "API key" in str(errors.get(timeout=10))
        ok.stop_stream()
        ok.close()
    finally:
        _stop(proc)


# ---------------------------------------------------------------------- decoding, in-process
def test_decode_request_parameters_and_defaults():
    r = _req(b"hi", params={"max_tokens": 5, "temperature": "0.5", "stop": '["a", "b"]', "ignore_eos": True,
                            "priority": 2})
    d = decode_request(r)
    assert d.prompt == "hi" and d.priority == 2 and d.stream is None
    assert d.sampling == {"max_tokens": 5, "temperature": 0.5, "stop": ["a", "b"], "ignore_eos": True}


def test_stop_string_that_looks_like_json_is_literal():
    assert decode_request(_req(b"hi", params={"stop": "[END]"})).sampling["stop"] == ["[END]"]
    assert decode_request(_req(b"hi", params={"stop": '["x", "y"]'})).sampling["stop"] == ["x", "y"]


def test_sampling_options_as_one_element_tensors():
    import struct

    r = _req(b"hi", params={"max_tokens": 7}, extra_inputs=[
        (_tensor("max_tokens", "INT32"), struct.pack("<i", 3)),
        (_tensor("temperature", "FP32"), struct.pack("<f", 0.5)),
        (_tensor("top_k", "INT64", shape=(1, 1)), struct.pack("<q", 5)),
        (_tensor("ignore_eos", "BOOL"), b"\x01")])
    d = decode_request(r)
    assert d.sampling == {"max_tokens": 7, "temperature": 0.5, "top_k": 5, "ignore_eos": True}  # parameter wins
    bad = _req(b"hi", extra_inputs=[(_tensor("max_tokens", "FP16"), b"\x00\x00")])
    with pytest.raises(ValueError, match="max_tokens: datatype"):
        decode_request(bad)
    with pytest.raises(ValueError, match="max_tokens"):
        decode_request(_req(b"hi", extra_inputs=[(_tensor("max_tokens", "INT32"), b"\x01\x00")]))


def test_infer_with_option_tensors(client):
    mt = grpcclient.InferInput("max_tokens", [1], "INT32")
    mt.set_data_from_numpy(np.array([4], dtype=np.int32))
    assert out_text(client.infer(MODEL, [text_input("hey"), mt])) == expected_text("hey", 4)


def test_decode_request_contents_form():
    r = service_pb2.ModelInferRequest(model_name=MODEL)
    t = r.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    t.contents.bytes_contents.append("héllo".encode())
    s = r.inputs.add(name="stream", datatype="BOOL", shape=[1])
    s.contents.bool_contents.append(True)
    d = decode_request(r)
    assert d.prompt == "héllo" and d.stream is True
