# SPDX-License-Identifier: Apache-2.0
"""Router + 1 prefill + 1 decode instance on the embedded SmolLM2 (CPU, loopback): outputs are
token-identical to a colocated engine on the same weights (the oracle, run in this process) for
greedy and seeded sampling, over HTTP streaming (text) and mindie.v1 gRPC streaming (token ids
and text); a first token that ends the request never reaches the decode instance; a stop string
spanning the hand-off is found; the transferred bytes and every pool's blocks are accounted for
in the router's /metrics afterwards."""
from __future__ import annotations

import time

import grpc
import pytest

from pd_cluster import start_cluster, stream_completion

pytestmark = pytest.mark.slow

pb2 = pytest.importorskip("mindie_llm.server.proto.mindie_generation_pb2")
pb2_grpc = pytest.importorskip("mindie_llm.server.proto.mindie_generation_pb2_grpc")

PROMPTS = ["The capital of France is", "Write a haiku about autumn:", "def fibonacci(n):"]
GREEDY = dict(temperature=0.0, max_tokens=10)
SEEDED = dict(temperature=0.8, top_p=0.95, seed=1234, max_tokens=10)


def tcp_only(cluster):
    if cluster.connector != "tcp":
        pytest.skip("not connector-specific: run once, over tcp")


@pytest.fixture(scope="module", params=["tcp", "p2p"])
def cluster(request, tmp_path_factory):
    """Both KV connectors: tcp (byte stream) and p2p (a gloo transfer group of the two instances)."""
    cl = start_cluster(tmp_path_factory.mktemp(f"pd11-{request.param}"), 1, 1, connector=request.param)
    cl.connector = request.param
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def reference():
    """Colocated outputs of the same requests: {(prompt, kind): (token_ids, text)}."""
    from mindie_llm.config import EngineConfig
    from mindie_llm.engine.llm_engine import LLMEngine
    from mindie_llm.sampling_params import SamplingParams

    from pd_cluster import BASE

    base = {k: v for k, v in BASE.items() if k in ("model", "cache", "scheduler", "backend")}
    eng = LLMEngine(EngineConfig.from_dict(base))
    out = {}
    for kind, params in (("greedy", GREEDY), ("seeded", SEEDED), ("one", dict(temperature=0.0, max_tokens=1))):
        for i, p in enumerate(PROMPTS):
            eng.add_request(f"{kind}{i}", p, SamplingParams(**params))
            while eng.has_unfinished_requests():
                for o in eng.step():
                    if o.finished:
                        out[(p, kind)] = (list(o.outputs[0].token_ids), o.outputs[0].text)
    return out


@pytest.mark.parametrize("kind, params", [("greedy", GREEDY), ("seeded", SEEDED)])
def test_http_streaming_matches_colocated(cluster, reference, kind, params):
    for p in PROMPTS:
        text, events = stream_completion(cluster.http_url, p, **params)
        assert text == reference[(p, kind)][1], (p, kind)
        assert events[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("kind, params", [("greedy", GREEDY), ("seeded", SEEDED)])
def test_grpc_streaming_matches_colocated(cluster, reference, kind, params):
    with grpc.insecure_channel(cluster.grpc_address) as ch:
        stub = pb2_grpc.GenerationServiceStub(ch)
        for p in PROMPTS:
            msgs = list(stub.GenerateStream(pb2.GenerateRequest(text=p, sampling=pb2.SamplingParameters(**params)),
                                            timeout=120))
            ids = [t for m in msgs for t in m.token_ids]
            assert ids == reference[(p, kind)][0], (p, kind)
            assert "".join(m.text for m in msgs) == reference[(p, kind)][1]
            assert msgs[-1].finished


def test_first_token_that_ends_the_request_stays_on_prefill(cluster, reference):
    tcp_only(cluster)
    before = cluster.metrics()
    for p in PROMPTS:
        text, events = stream_completion(cluster.http_url, p, temperature=0.0, max_tokens=1)
        assert text == reference[(p, "one")][1]
    after = cluster.metrics()
    count = 'mindie_pd_phase_seconds_count{instance="%s",phase="decode"}' % cluster.decode[0].address
    n = (lambda t: float(next((ln.split()[-1] for ln in t.splitlines() if ln.startswith(count)), 0)))
    assert n(after) == n(before)


def test_stop_string_across_the_hand_off(cluster, reference):
    tcp_only(cluster)
    ids, full = reference[(PROMPTS[0], "greedy")]
    stop = full[3:8]                      # inside the decode instance's part of the text
    text, events = stream_completion(cluster.http_url, PROMPTS[0], temperature=0.0, max_tokens=10, stop=[stop])
    assert text == full[:full.index(stop)]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_pools_return_and_metrics_account_for_transfers(cluster):
    time.sleep(0.6)                       # two health polls
    m = cluster.metrics()
    for p in cluster.prefill + cluster.decode:
        st = cluster.stats(p)
        assert st.num_free_kv_blocks == st.num_kv_blocks - 1, (p.name, st)
        assert st.num_pinned_requests == 0 and st.num_pending_transfers == 0
    assert cluster.stats(cluster.prefill[0]).kv_bytes_sent == cluster.stats(cluster.decode[0]).kv_bytes_received > 0
    assert 'mindie_pd_instance_up{instance="%s",role="decode"} 1.0' % cluster.decode[0].address in m
    assert "mindie_pd_transfer_bytes_total" in m


def test_kserve_infer_through_the_router(cluster, reference):
    tcp_only(cluster)
    import numpy as np

    grpcclient = pytest.importorskip("tritonclient.grpc")
    c = grpcclient.InferenceServerClient(cluster.grpc_address)
    try:
        assert c.is_server_ready()
        inp = grpcclient.InferInput("text_input", [1], "BYTES")
        inp.set_data_from_numpy(np.array([PROMPTS[0].encode()], dtype=np.object_))
        res = c.infer("SmolLM2-135M-Instruct", [inp], parameters={"max_tokens": 10, "temperature": "0"})
        assert res.as_numpy("text_output")[0].decode() == reference[(PROMPTS[0], "greedy")][1]
    finally:
        c.close()


def test_invalid_request_is_a_400_naming_the_field(cluster):
    tcp_only(cluster)
    import httpx

    r = httpx.post(f"{cluster.http_url}/v1/completions", timeout=60, json={
        "model": "SmolLM2-135M-Instruct", "prompt": "hello " * 600, "max_tokens": 4})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    r = httpx.post(f"{cluster.http_url}/v1/completions", timeout=60, json={
        "model": "SmolLM2-135M-Instruct", "prompt": "hi", "max_tokens": 4, "n": 2})
    assert r.status_code == 400 and "n" in r.json()["error"]["message"]
    r = httpx.post(f"{cluster.http_url}/v1/chat/completions", timeout=60, json={
        "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_internal_service_needs_the_key(cluster):
    tcp_only(cluster)
    from mindie_llm.server.proto import mindie_pd_pb2 as pd, mindie_pd_pb2_grpc as pdg

    with grpc.insecure_channel(cluster.prefill[0].address) as ch:
        for meta in ((), (("x-mindie-pd-key", "wrong"),)):
            with pytest.raises(grpc.RpcError) as e:
                pdg.PDInstanceStub(ch).Stats(pd.StatsRequest(), timeout=10, metadata=meta)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
