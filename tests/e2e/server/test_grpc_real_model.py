# SPDX-License-Identifier: Apache-2.0
"""gRPC over loopback against a server process serving the real default model (SmolLM2-135M on the
CPU): the generated mindie.v1 stubs and the official ``tritonclient[grpc]`` client.

Oracles: streaming and unary text are identical for the same seed; the KServe and mindie.v1 front
ends give the same greedy text; Tokenize/Detokenize round-trip; the KV pool returns to its idle free
count after cancelled streams. The server is ``mindie-llm serve`` started once for the module by the
shared ``server_factory`` fixture (tests/e2e/server/conftest.py). Tiny max_tokens keep it within a
couple of minutes on 2 cores.
"""
from __future__ import annotations

import queue
import time

import grpc
import numpy as np
import pytest

pb2 = pytest.importorskip("mindie_llm.server.proto.mindie_generation_pb2")
pb2_grpc = pytest.importorskip("mindie_llm.server.proto.mindie_generation_pb2_grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

_PROMPT = "The capital of France is"
@pytest.fixture(scope="module")
def port(server_factory):
    """The gRPC port of a ``mindie-llm serve`` process (the shared conftest's), HTTP off."""
    srv = server_factory({"cache": {"num_blocks": 1024},
                          "scheduler": {"max_queued_requests": 1024, "max_n": 4},
                          "server": {"http_port": -1}})
    return int(srv.grpc_address.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def stub(port):
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb2_grpc.GenerationServiceStub(ch)
    ch.close()


@pytest.fixture(scope="module")
def triton(port):
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    yield c
    c.close()


def _req(text: str = _PROMPT, **sampling) -> "pb2.GenerateRequest":
    return pb2.GenerateRequest(text=text, sampling=pb2.SamplingParameters(**sampling))


def _text_input(prompt: str) -> "grpcclient.InferInput":
    inp = grpcclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    return inp


# ---------------------------------------------------------------------- mindie.v1
def test_stream_equals_unary_for_the_same_seed(stub):
    r = _req(max_tokens=8, temperature=0.8, seed=1234)
    unary = stub.Generate(r, timeout=120)
    msgs = list(stub.GenerateStream(r, timeout=120))
    c = unary.completions[0]
    assert c.text and len(c.token_ids) >= 1
    assert "".join(m.text for m in msgs) == c.text
    assert [t for m in msgs for t in m.token_ids] == list(c.token_ids)
    assert msgs[-1].finished and msgs[-1].finish_reason == c.finish_reason != pb2.FINISH_REASON_UNSPECIFIED
    assert unary.usage.completion_tokens == len(c.token_ids)
    t = unary.timings
    assert t.total_ns > 0 and t.total_ns >= t.queue_ns and t.total_ns >= t.decode_ns


def test_n_samples_and_logprobs(stub):
    resp = stub.Generate(_req(max_tokens=4, temperature=1.0, seed=5, n=2, logprobs=3), timeout=120)
    assert [c.index for c in resp.completions] == [0, 1]
    for c in resp.completions:
        assert len(c.logprobs) == len(c.token_ids)
        for tok, lp in zip(c.token_ids, c.logprobs):
            assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top_logprobs) == 3
            assert [t.logprob for t in lp.top_logprobs] == sorted((t.logprob for t in lp.top_logprobs), reverse=True)


def test_stop_string_ends_the_text(stub):
    greedy = stub.Generate(_req(max_tokens=12, temperature=0.0), timeout=120).completions[0].text
    words = greedy.split()
    if len(words) < 2:
        pytest.skip("greedy continuation too short to pick a stop string")
    stop = words[1]
    resp = stub.Generate(_req(max_tokens=12, temperature=0.0, stop=[stop]), timeout=120).completions[0]
    assert resp.finish_reason == pb2.FINISH_REASON_STOP and resp.stop_string == stop
    assert resp.text == greedy[:greedy.index(stop)]


def test_logit_bias_forces_and_bans(stub):
    # Oracles: +100 on a token makes every generated id that token (greedy and seeded); -100 on the
    # greedy first token keeps it out of the output; a token id outside the vocabulary is refused.
    plain = list(stub.Generate(_req(max_tokens=5, temperature=0.0), timeout=120).completions[0].token_ids)
    target = next(t for t in (1234, 1235, 1236) if t not in plain)
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=3)):
        got = stub.Generate(_req(max_tokens=4, logit_bias={target: 100.0}, **kw), timeout=120).completions[0]
        assert list(got.token_ids) == [target] * 4
    banned = stub.Generate(_req(max_tokens=5, temperature=0.0, logit_bias={plain[0]: -100.0}), timeout=120)
    assert plain[0] not in banned.completions[0].token_ids
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(_req(max_tokens=2, logit_bias={10**6: 1.0}), timeout=120)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.logit_bias" in e.value.details()


def test_tokenize_detokenize_round_trip(stub):
    tok = stub.Tokenize(pb2.TokenizeRequest(text="Hello world, how are you?"), timeout=30)
    assert len(tok.token_ids) == len(tok.tokens) > 3
    assert stub.Detokenize(pb2.DetokenizeRequest(token_ids=tok.token_ids), timeout=30).text == \
        "Hello world, how are you?"
    gen = stub.Generate(_req("Hello world, how are you?", max_tokens=1, temperature=0.0), timeout=120)
    assert list(gen.prompt_token_ids) == list(tok.token_ids)


def test_model_info(stub):
    info = stub.ModelInfo(pb2.ModelInfoRequest(), timeout=30)
    assert "SmolLM2" in info.model and info.max_model_len == 512 and info.block_size >= 1
    assert info.num_kv_blocks == 1024 and info.vocab_size > 1000 and list(info.eos_token_ids)
    assert info.capabilities.chunked_prefill and info.capabilities.prefix_caching and info.max_n == 4


def test_health_and_reflection(port):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        for service in ("", "mindie.v1.GenerationService", "inference.GRPCInferenceService"):
            st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert st.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        ans = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=10))
        names = {s.name for s in ans[0].list_services_response.service}
        assert {"mindie.v1.GenerationService", "inference.GRPCInferenceService", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= names
        # The descriptors are served too (what grpcurl needs).
        ans = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="inference.GRPCInferenceService")]), timeout=10))
        assert ans[0].file_descriptor_response.file_descriptor_proto


E2E_MALFORMED = [
    ("prompt-longer-than-max-model-len", _req("hello " * 600, max_tokens=4), "prompt"),
    ("max-tokens-over-model-len", _req(max_tokens=600), "max_tokens"),
    ("token-id-outside-vocab", pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=[1, 10_000_000])), "token_ids"),
    ("n-over-max-n", _req(n=5), "n"),
    ("temperature-nan", _req(temperature=float("nan")), "temperature"),
    ("empty-text", _req(""), "text"),
    ("stop-token-negative", _req(stop_token_ids=[-1]), "stop_token_ids"),
    ("logprobs-over-limit", _req(logprobs=1000), "logprobs"),
]


@pytest.mark.parametrize("case", E2E_MALFORMED, ids=[c[0] for c in E2E_MALFORMED])
def test_malformed_requests_against_the_real_engine(stub, case):
    _, request, field = case
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as e:
            call(request, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
    assert stub.Generate(_req(max_tokens=1), timeout=120).completions[0].token_ids   # the canary


# ---------------------------------------------------------------------- KServe, via tritonclient
def test_tritonclient_infer_equals_native_greedy(stub, triton):
    assert triton.is_server_live() and triton.is_server_ready()
    model = stub.ModelInfo(pb2.ModelInfoRequest(), timeout=30).model
    assert triton.is_model_ready(model)
    native = stub.Generate(_req(max_tokens=6, temperature=0.0), timeout=120).completions[0].text
    res = triton.infer(model, [_text_input(_PROMPT)], parameters={"max_tokens": 6, "temperature": "0"})
    assert res.as_numpy("text_output")[0].decode() == native


def test_tritonclient_stream_infer_equals_infer(stub, triton):
    model = stub.ModelInfo(pb2.ModelInfoRequest(), timeout=30).model
    params = {"max_tokens": 6, "temperature": "0.7", "seed": 99}
    unary = triton.infer(model, [_text_input(_PROMPT)], parameters=dict(params)).as_numpy("text_output")[0].decode()
    got: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        triton.async_stream_infer(model, [_text_input(_PROMPT)], request_id="s1", parameters=dict(params))
        pieces = []
        while True:
            result, error = got.get(timeout=120)
            assert error is None, error
            resp = result.get_response()
            pieces.append(result.as_numpy("text_output")[0].decode())
            if resp.parameters["triton_final_response"].bool_param:
                break
    finally:
        triton.stop_stream()
    assert "".join(pieces) == unary
    assert resp.parameters["completion_tokens"].int64_param >= 1


# ---------------------------------------------------------------------- cancellation and load
def _free_blocks(stub) -> int:
    return stub.ModelInfo(pb2.ModelInfoRequest(), timeout=30).num_free_kv_blocks


def test_64_cancelled_streams_return_their_kv_blocks(stub):
    baseline = _free_blocks(stub)
    calls = [stub.GenerateStream(_req(f"Story number {i}:", max_tokens=200, temperature=0.0, ignore_eos=True),
                                 timeout=300) for i in range(64)]
    for c in calls:
        next(c)   # every stream is generating
    assert _free_blocks(stub) < baseline
    for c in calls:
        c.cancel()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _free_blocks(stub) != baseline:
        time.sleep(0.2)
    assert _free_blocks(stub) == baseline
    assert stub.Generate(_req(max_tokens=1), timeout=120).completions[0].token_ids


def test_500_concurrent_requests_none_lost(port):
    """Every request gets a result or an explicit error; the figures are printed (for
    docs/performance.md), not asserted."""
    import argparse

    from mindie_llm.bench import serve_client as bench_client

    args = bench_client.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--protocol", "grpc", "--port", str(port), "--num-requests", "500", "--input-len", "8",
         "--output-len", "4", "--timeout", "300"])
    results, duration, _ = bench_client.run_benchmark(args)
    assert len(results) == 500
    lost = [r.index for r in results if not r.success and not r.error]
    assert not lost, f"requests with neither a result nor an error: {lost[:10]}"
    summary = bench_client.summarize(results, duration)
    print({k: v for k, v in summary.items() if not k.startswith("mean_")})
    assert summary["completed"] == 500, summary["errors"]   # the queue (1024) admits them all
